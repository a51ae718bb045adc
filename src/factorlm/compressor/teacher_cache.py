"""Teacher log-probabilities computed once and kept as top-k (values, indices) in safetensors.

The dense teacher's forward costs about a third of a distillation step; with a cache it runs
once per window, whichever number of epochs, resumes or runs follow. Only the ``k`` most likely
tokens per position are kept: with ``k`` = vocabulary size the loss equals the on-the-fly KL;
with a smaller ``k`` the other tokens become one tail bucket (the teacher's remaining mass against
the student's), a KL over k + 1 categories and a lower bound of the full one, see :func:`topk_kl`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from .dist_env import DistEnv, barrier


def topk_kl(student_logits: torch.Tensor, top_logp: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
    """KL over k + 1 categories: the teacher's top-k tokens and one tail bucket, averaged over tokens.

    The bucket holds the teacher's remaining mass 1 − Σ_top-k p against the student's remaining
    mass 1 − Σ_top-k q, so the student cannot gain by pushing the other tokens to zero (a loss over
    the top-k terms alone would reward it). Merging categories never raises a KL, so this is a
    lower bound of the full-vocabulary KL, equal to it when k = vocabulary size.
    """
    logits = student_logits.float()
    logz = logits.logsumexp(-1)
    idx = top_idx.long()
    logq = logits.gather(-1, idx) - logz.unsqueeze(-1)
    p = top_logp.exp()
    head = (p * (top_logp - logq)).sum(-1)
    if idx.shape[-1] >= logits.shape[-1]:
        return head.mean()
    p_tail = (1.0 - p.sum(-1)).clamp(min=0.0)
    logq_tail = logits.scatter(-1, idx, float("-inf")).logsumexp(-1) - logz
    tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp(min=1e-30).log() - logq_tail), torch.zeros_like(p_tail))
    return (head + tail).mean()


@torch.no_grad()
def teacher_topk(teacher: nn.Module, windows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [N, T, k] float32, token ids [N, T, k] int32) of the teacher's top-k per position."""
    vals, idx = [], []
    for row in windows.split(1):
        logp = teacher(input_ids=row).logits.float().log_softmax(-1)
        v, i = logp.topk(min(k, logp.shape[-1]), dim=-1)
        vals.append(v.cpu())
        idx.append(i.to(torch.int32).cpu())
    return torch.cat(vals), torch.cat(idx)


def cache_key(windows: torch.Tensor, k: int, teacher_id: str) -> str:
    """Content hash naming a cache: the windows' token ids, k and the teacher."""
    h = hashlib.sha256(windows.to(torch.int64).numpy().tobytes())
    h.update(f"{k}|{teacher_id}".encode())
    return h.hexdigest()[:16]


def load_or_build(teacher: nn.Module, windows: torch.Tensor, k: int, cache_dir: Path | None, teacher_id: str,
                  env: DistEnv) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k cache for ``windows``: read from ``cache_dir`` when present, else computed.

    Ranks each compute an equal slice (so every core works), rank 0 gathers and writes the
    file atomically; the others wait and take the gathered tensors.
    """
    key = cache_key(windows, k, teacher_id)
    path = cache_dir / f"teacher-top{k}-{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        t = load_file(str(path))
        return t["logp"], t["idx"]
    n, w = windows.shape[0], env.world_size
    per = -(-n // w)
    mine = windows[env.rank * per:(env.rank + 1) * per]
    if mine.shape[0] < per:  # pad the last slice so every rank sends the same shape
        mine = torch.cat([mine, windows[:per - mine.shape[0]]])
    vals, idx = teacher_topk(teacher, mine, k)
    if env.active:
        gv, gi = [torch.empty_like(vals) for _ in range(w)], [torch.empty_like(idx) for _ in range(w)]
        dist.all_gather(gv, vals)
        dist.all_gather(gi, idx)
        vals, idx = torch.cat(gv)[:n], torch.cat(gi)[:n]
    if path is not None and env.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"logp": vals.contiguous(), "idx": idx.contiguous()}, str(tmp),
                  metadata={"k": str(k), "teacher": teacher_id, "windows": json.dumps(list(windows.shape))})
        tmp.replace(path)
    barrier(env)
    return vals, idx
