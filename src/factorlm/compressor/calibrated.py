"""Activation-aware methods (asvd, svd-llm) with statistics from one dense calibration pass.

This is the single-stream variant: input statistics of every block linear are gathered by
forward hooks on the dense model, then each layer is factorized from them. (The block-wise
teacher/student streaming that SAES needs builds on the same math in ``whitening``.)
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..runtime.format import FactorlmError
from .whitening import accumulate_gram, asvd_factors, svdllm_factors, whiten

logger = logging.getLogger(__name__)


def calibration_ids(tokenizer: Any, text_path: str | Path, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens from a text/jsonl file, tokenized once, seeded."""
    p = Path(text_path)
    if not p.is_file():
        raise FactorlmError(f"{p}: calibration file not found")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".jsonl":
        import json
        text = "\n\n".join(json.loads(line).get("text", "") for line in text.splitlines() if line.strip())
    if not text.strip():
        raise FactorlmError(f"{p}: calibration text is empty")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() < seq_len + 1:
        raise FactorlmError(f"{p}: calibration text too short: {ids.numel()} tokens, need more than {seq_len}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - seq_len) for _ in range(n_samples)]
    return torch.stack([ids[s:s + seq_len] for s in starts])


@torch.no_grad()
def collect_input_stats(model: nn.Module, linears: dict[str, nn.Linear], batches: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Gram (fp64) and mean |x| per input channel of every linear in ``linears``."""
    stats: dict[str, dict[str, Any]] = {n: {"gram": None, "abs_sum": None, "count": 0} for n in linears}

    def hook(name: str) -> Callable[..., None]:
        def fn(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            if not torch.isfinite(x).all():
                raise FactorlmError(f"layer {name!r}: calibration activations contain NaN or Inf")
            s = stats[name]
            s["gram"] = accumulate_gram(s["gram"], x)
            a = x.double().abs().sum(0)
            s["abs_sum"] = a if s["abs_sum"] is None else s["abs_sum"] + a
            s["count"] += x.shape[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        for row in batches:
            model(input_ids=row[None].to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return stats


def factorize_with_stats(method: str, weight: torch.Tensor, stats: dict[str, Any], rank: int,
                         damping: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Factors (u, v) for ``asvd`` or ``svd-llm`` and report fields (fallback used)."""
    if method == "asvd":
        u, v = asvd_factors(weight, stats["abs_sum"] / stats["count"], rank)
        return u, v, {"fallback": None}
    if method == "svd-llm":
        white = whiten(stats["gram"], damping=damping)
        if white.fallback:
            logger.warning("whitening fallback: %s", white.fallback)
        u, v, _ = svdllm_factors(weight, white, rank)
        return u, v, {"fallback": white.fallback}
    raise FactorlmError(f"unknown calibrated method {method!r}")
