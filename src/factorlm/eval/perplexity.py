"""WikiText-style perplexity over non-overlapping windows (the convention of the SVD papers).

The text is tokenized once, cut into consecutive windows of ``window`` tokens (the last,
shorter one is kept), and every token after the first of each window is scored.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..runtime.format import FactorlmError

logger = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    """Perplexity and what it was measured on."""

    ppl: float
    nll: float
    tokens_scored: int
    windows: int
    window: int


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of one window and the number of scored tokens."""
    loss = F.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum")
    return float(loss), int(ids.numel() - 1)


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file, failing clearly when it is missing or empty."""
    p = Path(path)
    if not p.is_file():
        raise FactorlmError(f"{p}: text file not found")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise FactorlmError(f"{p}: text file is empty")
    return text


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, text: str, *, window: int = 2048, max_tokens: int | None = None,
               progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` over non-overlapping windows of ``window`` tokens."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise FactorlmError(f"text too short: {ids.numel()} token(s), need at least 2")
    device = next(model.parameters()).device
    total, count, n_windows = 0.0, 0, 0
    starts = range(0, ids.numel(), window)
    for start in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
        chunk = ids[start:start + window]
        if chunk.numel() < 2:
            continue
        logits = model(input_ids=chunk[None].to(device)).logits[0]
        if not torch.isfinite(logits).all():
            raise FactorlmError(f"non-finite logits in window starting at token {start}")
        nll, n = window_nll(logits, chunk.to(device))
        total, count, n_windows = total + nll, count + n, n_windows + 1
    mean = total / count
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens_scored=count, windows=n_windows, window=window)
