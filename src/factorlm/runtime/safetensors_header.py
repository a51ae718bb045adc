"""Reading safetensors headers without reading tensor data, and checking the file holds what they promise.

The strict checkpoint checks (:mod:`.verify`), the compressor's source checks and ``factorlm
inspect`` all read headers through here: a truncated, empty or corrupt file is a
:class:`~.format.FormatError` naming the file, before a byte of tensor data is read.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .format import FormatError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit

# safetensors dtype code -> (torch dtype name, bytes per element or None when sub-byte/packed)
SAFETENSORS_DTYPES: dict[str, tuple[str, int | None]] = {
    "BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1), "U16": ("uint16", 2), "I16": ("int16", 2),
    "U32": ("uint32", 4), "I32": ("int32", 4), "U64": ("uint64", 8), "I64": ("int64", 8),
    "F16": ("float16", 2), "BF16": ("bfloat16", 2), "F32": ("float32", 4), "F64": ("float64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1), "F8_E8M0": ("float8_e8m0fnu", 1),
    "F4": ("float4_e2m1fn_x2", None), "F6_E2M3": ("float6_e2m3", None), "F6_E3M2": ("float6_e3m2", None),
    "C64": ("complex64", 8),
}
FLOAT_CODES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"}


@dataclass(frozen=True)
class TensorHeader:
    """What a safetensors header says about one tensor, and which file holds it."""

    name: str
    code: str  # safetensors dtype code, e.g. "F32"
    shape: tuple[int, ...]
    file: Path

    @property
    def dtype(self) -> str:
        """The torch dtype name (``float32``, ``bfloat16``, ...)."""
        return SAFETENSORS_DTYPES[self.code][0]

    @property
    def is_floating(self) -> bool:
        return self.code in FLOAT_CODES


def read_header(path: str | os.PathLike) -> dict[str, TensorHeader]:
    """Parse one safetensors header and check that the file holds every byte it promises.

    A truncated, empty or corrupt file is a :class:`FormatError` that names the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise FormatError(f"{path}: not a safetensors file ({size} bytes; truncated or empty)")
            (n,) = struct.unpack("<Q", prefix)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise FormatError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, "
                                  f"file of {size} bytes)")
            raw = fh.read(n)
    except FileNotFoundError:
        raise FormatError(f"{path}: safetensors file not found") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot read safetensors file: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: corrupt safetensors header (not valid JSON: {exc})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    tensors = {name: _parse_entry(path, name, entry) for name, entry in header.items()}
    _check_data_span(path, header, size - 8 - n)
    return tensors


def _parse_entry(path: Path, name: str, entry: Any) -> TensorHeader:
    try:
        code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not 0 <= begin <= end:
            raise ValueError("bad shape or offsets")
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{path}: corrupt safetensors header entry for tensor {name!r}: {entry!r}") from None
    if code not in SAFETENSORS_DTYPES:
        raise FormatError(f"{path}: tensor {name!r} has unknown safetensors dtype {code!r}")
    itemsize = SAFETENSORS_DTYPES[code][1]
    numel = 1
    for d in shape:
        numel *= d
    if itemsize is not None and numel * itemsize != end - begin:
        raise FormatError(f"{path}: corrupt safetensors header: tensor {name!r} of shape {shape} and dtype "
                          f"{code} needs {numel * itemsize} bytes, its offsets span {end - begin}")
    return TensorHeader(name, code, shape, path)


def _check_data_span(path: Path, header: dict[str, Any], data_bytes: int) -> None:
    spans = sorted(tuple(e["data_offsets"]) for e in header.values())
    needed = spans[-1][1] if spans else 0
    if needed > data_bytes:
        raise FormatError(f"{path}: truncated safetensors file: its header promises {needed} bytes of tensor "
                          f"data, the file holds {data_bytes}")
    position = 0
    for begin, end in spans:
        if begin != position:
            raise FormatError(f"{path}: corrupt safetensors header: tensor data overlaps or has a gap at byte {begin}")
        position = end
    if position != data_bytes:
        raise FormatError(f"{path}: corrupt safetensors file: {data_bytes - position} bytes after the last tensor")


def read_headers(files: Iterable[str | os.PathLike]) -> dict[str, TensorHeader]:
    """Headers of every file of a checkpoint; a tensor stored in two files is an error."""
    headers: dict[str, TensorHeader] = {}
    for file in files:
        for name, info in read_header(file).items():
            if name in headers:
                raise FormatError(f"{info.file}: tensor {name!r} is also stored in {headers[name].file}")
            headers[name] = info
    return headers


__all__ = ["FLOAT_CODES", "SAFETENSORS_DTYPES", "TensorHeader", "read_header", "read_headers"]
