"""Left-padded batched KV state: pure tensor functions to add and remove sequences.

The running batch keeps one transformers ``DynamicCache`` of shape [B, kv_heads, L, head_dim]
per layer plus a 0/1 attention mask [B, L]. Sequences of different lengths are aligned to
the right (left padding, masked out), so one decode step feeds one new token per row.
When the batch composition changes the cache is rebuilt: new rows are padded in, finished
rows sliced out and all-padding columns trimmed. Keys were rotated at their true positions
during prefill, and masked columns get zero attention weight, so each row computes what it
would compute alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a DynamicCache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def build_cache(tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A DynamicCache holding the given per-layer (keys, values)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for idx, (keys, values) in enumerate(tensors):
        cache.update(keys, values, idx)
    return cache


def left_pad(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zero-pad ``x`` on the left of dimension ``dim`` up to ``length``."""
    missing = length - x.shape[dim]
    if missing <= 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [missing, 0]
    return F.pad(x, pad)


def merge(
    a: list[tuple[torch.Tensor, torch.Tensor]] | None, a_mask: torch.Tensor | None,
    b: list[tuple[torch.Tensor, torch.Tensor]], b_mask: torch.Tensor,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Concatenate two left-padded batches along the batch dimension, aligning their ends."""
    if a is None or a_mask is None:
        return b, b_mask
    length = max(a_mask.shape[1], b_mask.shape[1])
    layers = [
        (torch.cat([left_pad(ka, length, 2), left_pad(kb, length, 2)]),
         torch.cat([left_pad(va, length, 2), left_pad(vb, length, 2)]))
        for (ka, va), (kb, vb) in zip(a, b)
    ]
    mask = torch.cat([left_pad(a_mask, length, 1), left_pad(b_mask, length, 1)])
    return layers, mask


def select(
    layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, rows: list[int],
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Keep ``rows`` of the batch and drop leading columns that are padding in every kept row."""
    index = torch.tensor(rows, dtype=torch.long, device=mask.device)
    mask = mask.index_select(0, index)
    start = int((mask.sum(0) == 0).long().cumprod(0).sum().item())  # leading all-padding columns
    mask = mask[:, start:]
    layers = [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:]) for k, v in layers]
    return layers, mask


def token_logprobs(logits: torch.Tensor, token_id: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of ``token_id`` under row logits [V] and the ``top`` best (id, logprob) pairs."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best: list[tuple[int, float]] = []
    if top > 0:
        values, ids = torch.topk(logp, min(top, logp.shape[-1]))
        best = [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist())]
    return float(logp[token_id]), best
