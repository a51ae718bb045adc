"""Streaming safetensors output: finished blocks go to disk, then into HF-style shards.

Each finished decoder block is written at once to its own small safetensors file (in the
checkpoint's dtype), so compressed blocks never accumulate in RAM and a killed run keeps
what it finished (see :mod:`.resume`). :func:`write_shards` then packs every tensor, in the
model's ``state_dict`` order, into ``model-0000i-of-0000n.safetensors`` files of at most
``max_shard_size`` bytes (one ``model.safetensors`` when it all fits), writing each shard's
header first and then the tensors one by one, so at most one tensor is in memory; the
index ``model.safetensors.index.json`` follows, as ``save_pretrained`` writes it.

A tensor with an ``on_written`` callback is flushed and fsynced before the callback gets the
number of tensors now durably written, so the caller can record progress and remove inputs;
``write_shards(start=n)`` continues such a run: shards before tensor ``n`` are kept, the one
holding it is cut back to it (its header checked against the plan) and writing goes on.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors.torch import save_file

from ..runtime.format import FactorlmError

ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


def shard_size_bytes(size: str | int) -> int:
    """``5GB``/``500MB``/a byte count as bytes (the units transformers' ``max_shard_size`` takes)."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        value = int(convert_file_size_to_int(size))
    except ValueError as exc:
        raise FactorlmError(f"--max-shard-size: {exc}") from None
    if value <= 0:
        raise FactorlmError(f"--max-shard-size must be positive, got {size!r}")
    return value


def write_block_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One block's finished tensors as a safetensors file, atomically (temp name, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


@dataclass
class OutTensor:
    """One tensor of the output: its name, dtype, shape and how to fetch its data when written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    fetch: Callable[[], torch.Tensor]
    on_written: Callable[[int], None] | None = None

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(tensors: Sequence[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    """Greedy packing in order, as ``save_pretrained`` does: a new shard when the next tensor would overflow."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(tensors: Sequence[OutTensor]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes with spaces


def _open_shard(path: Path, header: bytes, tensors: Sequence[OutTensor], skip: int) -> BinaryIO:
    """``path`` opened for writing after its first ``skip`` tensors (a new file when ``skip`` is 0)."""
    if skip == 0:
        fh = open(path, "wb")
        fh.write(struct.pack("<Q", len(header)))
        fh.write(header)
        return fh
    offset = 8 + len(header) + sum(t.nbytes for t in tensors[:skip])
    if not path.is_file() or path.stat().st_size < offset:
        raise FactorlmError(f"{path}: the partly packed shard is shorter than its recorded progress")
    fh = open(path, "r+b")
    if fh.read(8 + len(header)) != struct.pack("<Q", len(header)) + header:
        fh.close()
        raise FactorlmError(f"{path}: the partly packed shard's header differs from the packing plan")
    fh.truncate(offset)
    fh.seek(offset)
    return fh


def _write_shard(path: Path, tensors: Sequence[OutTensor], first: int, start: int) -> None:
    """Write shard ``path`` (tensors ``first``.. of the output), skipping those before ``start``."""
    header = _header(tensors)
    skip = max(0, start - first)
    if skip >= len(tensors):  # finished by an earlier run
        size = 8 + len(header) + sum(t.nbytes for t in tensors)
        if not path.is_file() or path.stat().st_size != size:
            raise FactorlmError(f"{path}: a shard recorded as packed is missing or has the wrong size")
        return
    with _open_shard(path, header, tensors, skip) as fh:
        for j, t in enumerate(tensors[skip:], start=first + skip):
            data = t.fetch().detach().to("cpu").contiguous()
            if data.dtype != t.dtype or tuple(data.shape) != t.shape:
                raise FactorlmError(f"tensor {t.name!r}: got {data.dtype} {tuple(data.shape)}, "
                                    f"planned {t.dtype} {t.shape}")
            if data.numel():
                fh.write(data.reshape(-1).view(torch.uint8).numpy().data)
            del data
            if t.on_written is not None:
                fh.flush()
                os.fsync(fh.fileno())
                t.on_written(j + 1)


def write_shards(folder: Path, tensors: Sequence[OutTensor], max_shard_size: str | int,
                 start: int = 0) -> list[Path]:
    """Write ``tensors`` into ``folder`` as HF-style shards (+ index) or one ``model.safetensors``.

    ``start`` > 0 continues a packing whose first ``start`` tensors are already on disk.
    """
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise FactorlmError("duplicate tensor names in the output")
    shards = plan_shards(tensors, shard_size_bytes(max_shard_size))
    if len(shards) == 1:
        path = folder / "model.safetensors"
        _write_shard(path, shards[0], 0, start)
        return [path]
    paths = []
    weight_map: dict[str, str] = {}
    first = 0
    for i, shard in enumerate(shards, start=1):
        path = folder / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(path, shard, first, start)
        first += len(shard)
        paths.append(path)
        weight_map.update({t.name: path.name for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return paths
