"""Argument helpers shared by subcommands: model paths, flag validators, checks before long work.

Everything here is cheap and imports neither torch nor transformers unless a flag needs it
(``--device cuda`` asks torch whether CUDA is there), so a bad flag is refused in well
under a second, before any model is loaded. argparse names the flag in the message:
``factorlm: error: argument --batch-size: must be an integer >= 1, got '0'``.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from ..runtime.format import FactorlmError, read_config_json

SAMPLE_ALIAS = "sample"
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def resolve_model_path(value: str) -> Path:
    """A local model folder, a hub id (``org/name``) already in the local Hugging Face cache, or
    ``sample`` for the built-in sample model (materialised on demand).

    Hub ids are not fetched: download once with ``huggingface-cli download org/name``, so runs
    are reproducible offline.
    """
    if value == SAMPLE_ALIAS:
        from ..sample_model import materialize_sample_model

        return materialize_sample_model()
    path = Path(value)
    if not path.exists() and value.count("/") == 1 and not value.startswith((".", "/")):
        from ..compressor.source import resolve_source

        return resolve_source(value)
    if not path.exists():
        raise FactorlmError(f"{path}: model folder not found (give a local folder, or 'sample' for the built-in model)")
    if not path.is_dir():
        raise FactorlmError(f"{path}: not a folder")
    return path


def input_path(value: str) -> Path:
    """Where a model argument lives, without materialising the sample model (for output checks)."""
    if value == SAMPLE_ALIAS:
        from ..sample_model import sample_model_path

        return sample_model_path()
    return Path(value)


# --------------------------------------------------------------------------- argparse types


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def float_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False,
             hint: str = "") -> Callable[[str], float]:
    """An argparse type: a finite float in the interval from ``low`` to ``high`` (open ends as flagged)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not inside:  # NaN lands here too
            raise argparse.ArgumentTypeError(f"must be in {interval}{hint}, got {text!r}")
        return value

    parse.__name__ = f"float_in_{interval}"
    return parse


positive_float = float_in(0, float("inf"), low_open=True, high_open=True)
non_negative_float = float_in(0, float("inf"), high_open=True)


_DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(?::(\d+))?")


def device_type(kinds: Sequence[str] = ("cpu", "cuda", "mps", "xpu"), index: bool = True) -> Callable[[str], str]:
    """An argparse type for ``--device``: a known device that this machine has.

    The syntax is checked without torch; ``cuda``/``mps``/``xpu`` then ask torch whether the
    device exists (about as long as importing torch), still before any model is loaded.
    """
    spelled = ", ".join(f"{k}[:N]" if index and k != "cpu" else k for k in kinds)

    def parse(text: str) -> str:
        match = _DEVICE.fullmatch(text.strip().lower())
        if not match or match.group(1) not in kinds or (match.group(2) is not None and (not index or
                                                                                     match.group(1) == "cpu")):
            raise argparse.ArgumentTypeError(f"unknown device {text!r}; choose {spelled}")
        kind, number = match.group(1), match.group(2)
        if kind != "cpu":
            _check_available(text, kind, int(number) if number is not None else None)
        return match.group(0)

    parse.__name__ = "device"
    return parse


def _check_available(text: str, kind: str, number: int | None) -> None:
    import torch

    backend = getattr(torch, kind, None)
    if backend is None or not backend.is_available():
        build = " (this torch is a CPU-only build)" if kind == "cuda" and torch.version.cuda is None else ""
        raise argparse.ArgumentTypeError(f"{text!r}: no {kind.upper()} device is available to torch "
                                         f"{torch.__version__}{build}")
    count = backend.device_count()
    if number is not None and number >= count:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} {kind.upper()} device(s), "
                                         f"numbered from 0")


# --------------------------------------------------------------------------- checks before long work


def check_output(path: str | os.PathLike, *, overwrite: bool = False, inputs: Sequence[str | os.PathLike] = (),
                 kind: str = "folder") -> Path:
    """Refuse an output that could not be written, before any work: run it first thing in a command.

    Checks that an existing ``folder`` output is a folder and is only replaced with
    ``--overwrite``, that it is not (and does not contain) an input, and that the nearest
    existing parent is a folder this process can create entries in (tried, not guessed:
    read-only mounts and ACLs count). ``kind="file"`` checks a file output the same way.
    """
    out = Path(path)
    if out.exists():
        if kind == "folder" and not out.is_dir():
            raise FactorlmError(f"{out}: exists and is a file, not a folder")
        if kind == "file" and out.is_dir():
            raise FactorlmError(f"{out}: is a folder; give a file name")
        if kind == "folder" and not overwrite:
            raise FactorlmError(f"{out}: output directory exists; pass --overwrite to replace it")
    for source in inputs:
        src = Path(source)
        if src.exists() and (out.resolve() == src.resolve() or out.resolve() in src.resolve().parents):
            if out.resolve() == src.resolve():
                raise FactorlmError(f"{out}: the output must be a different folder than the input")
            if overwrite:
                raise FactorlmError(f"{out}: replacing it would delete the input {src} inside it")
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise FactorlmError(f"{out}: cannot create it: {parent} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".factorlm-write-check-", dir=parent))
    except OSError as exc:
        raise FactorlmError(f"{out}: cannot write in {parent}: {exc.strerror or exc}") from None
    return out


def context_length(model_dir: str | os.PathLike) -> int | None:
    """The context length config.json declares (``max_position_embeddings`` or its aliases), if any."""
    config = read_config_json(model_dir)
    for scope in (config, config.get("text_config") or {}):
        for key in CONTEXT_KEYS:
            value = scope.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def check_context(model_dir: str | os.PathLike, length: int, flag: str) -> None:
    """``flag``'s token count must fit the model's context; read from config.json, before any load."""
    limit = context_length(model_dir)
    if limit is not None and length > limit:
        raise FactorlmError(f"{flag} {length} exceeds the model's context length {limit} "
                            f"({Path(model_dir) / 'config.json'}); use {flag} {limit} or less")


def add_quant_kernel_flag(p: argparse.ArgumentParser) -> None:
    """``--quant-kernel``: the matmul path of a quantized checkpoint's layers (torch engine)."""
    p.add_argument("--quant-kernel", default="cached", metavar="NAME",
                   help="quantized checkpoints, torch: 'cached' (default; exact, fp32 matmuls on the codes "
                        "dequantized at load) or 'fastest' (int8/int4 kernels with bf16 activations where a layer "
                        "fits: faster, within 2e-2 of exact); the others: docs/format.md")


def check_quant_kernel(name: str) -> None:
    """Refuse an unknown ``--quant-kernel`` before any model is loaded."""
    from ..runtime.quant_kernels import kernel_names

    if name not in kernel_names():
        raise FactorlmError(f"--quant-kernel {name!r}: unknown; choose from {', '.join(kernel_names())}")
