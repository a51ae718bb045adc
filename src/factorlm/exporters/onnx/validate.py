"""ONNX Runtime vs PyTorch logits over a grid of batch sizes, prompt lengths and cached decode steps.

Pure comparison helpers are separate from the loop. Batch > 1 rows are left padded to
different lengths, so the padding and ``position_ids`` paths are checked as well; only
positions the attention mask marks as real are compared.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ...runtime.format import FactorlmError
from .graph import CacheShape, FlatDecoder, input_names, position_ids_from_mask

log = logging.getLogger(__name__)

DEFAULT_BATCHES = (1, 3)
DEFAULT_PROMPT_LENGTHS = (1, 17, 64)
DEFAULT_DECODE_STEPS = 3
# max |Δlogit| allowed, relative to max(1, max |logit|) of the reference
TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2, "int8": None}


class ValidationError(FactorlmError):
    """ONNX Runtime logits differ from PyTorch beyond the tolerance."""


@dataclass
class Worst:
    """Largest logit difference seen, and where."""

    max_abs_diff: float = 0.0
    rel_diff: float = 0.0
    batch: int = 1
    prompt_length: int = 0
    step: str = "prefill"
    row: int = 0
    position: int = 0
    argmax_mismatches: int = 0
    compared_positions: int = 0
    cases: list[str] = field(default_factory=list)

    def where(self) -> str:
        return (f"batch {self.batch}, prompt length {self.prompt_length}, {self.step}, row {self.row}, "
                f"position {self.position}")


def left_padded_mask(batch: int, length: int) -> torch.Tensor:
    """[batch, length] int64 mask; row r keeps length - 3r real tokens (at least 1)."""
    mask = torch.zeros(batch, length, dtype=torch.long)
    for r in range(batch):
        real = max(1, length - 3 * r)
        mask[r, length - real:] = 1
    return mask


def compare(ref: np.ndarray, got: np.ndarray, mask: np.ndarray) -> tuple[float, float, int, int, int]:
    """(max abs diff, its relative size, row, position, argmax mismatches) over masked-in positions.

    ``ref``/``got`` are [B, S, V]; ``mask`` is [B, S] (1 = real token).
    """
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    diff = np.where(mask[..., None] > 0, diff, 0.0)
    if not np.isfinite(got[mask > 0]).all():
        raise ValidationError("ONNX Runtime produced non-finite logits at real positions")
    flat = int(diff.reshape(diff.shape[0], diff.shape[1], -1).max(-1).argmax())
    row, pos = divmod(flat, diff.shape[1])
    scale = max(1.0, float(np.abs(ref[mask > 0]).max()))
    mismatches = int(((ref.argmax(-1) != got.argmax(-1)) & (mask > 0)).sum())
    return float(diff.max()), float(diff.max()) / scale, row, pos, mismatches


def validate_graph(session: Any, model: torch.nn.Module, dtype: str, batches=DEFAULT_BATCHES,
                   prompt_lengths=DEFAULT_PROMPT_LENGTHS, decode_steps: int = DEFAULT_DECODE_STEPS,
                   seed: int = 0) -> Worst:
    """Run the grid; raise ``ValidationError`` naming the worst position when over tolerance.

    ``model`` is the PyTorch model the graph was exported from (same dtype). Decode steps feed
    each side its own cache (ORT: the graph's presents; torch: its DynamicCache) and the same
    next token, chosen greedily from the PyTorch logits.
    """
    shape = CacheShape.from_config(model.config)
    names = input_names(shape)
    flat = FlatDecoder(model).eval()
    vocab = model.config.vocab_size
    param_dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    worst = Worst()
    kv_dtype = np.float16 if "float16" in session.get_inputs()[3].type else np.float32
    for batch in batches:
        for length in prompt_lengths:
            ids = torch.randint(3, vocab, (batch, length), generator=gen)
            mask = left_padded_mask(batch, length)
            past = [torch.zeros(batch, shape.num_kv_heads, 0, shape.head_dim, dtype=param_dtype)
                    for _ in range(2 * shape.num_layers)]
            torch_past, ort_past = past, [p.numpy().astype(kv_dtype) for p in past]
            for step in range(decode_steps + 1):
                full_mask = mask if step == 0 else torch.cat([mask, torch.ones(batch, step, dtype=torch.long)], 1)
                pos = position_ids_from_mask(full_mask)[:, -ids.shape[1]:]
                with torch.inference_mode():
                    ref_out = flat(ids, full_mask, pos, *torch_past)
                feed = dict(zip(names, [ids.numpy(), full_mask.numpy(), pos.numpy(), *ort_past]))
                got_out = session.run(None, feed)
                ref = ref_out[0].float().numpy()
                cmp_mask = full_mask[:, -ids.shape[1]:].numpy()
                abs_d, rel_d, row, p, mism = compare(ref, got_out[0].astype(np.float32), cmp_mask)
                worst.compared_positions += int(cmp_mask.sum())
                worst.argmax_mismatches += mism
                label = "prefill" if step == 0 else f"decode step {step}"
                if rel_d >= worst.rel_diff:
                    worst.max_abs_diff, worst.rel_diff = abs_d, rel_d
                    worst.batch, worst.prompt_length, worst.step, worst.row = batch, length, label, row
                    worst.position = p + (full_mask.shape[1] - ids.shape[1])
                torch_past = [t.clone() for t in ref_out[1:]]
                ort_past = got_out[1:]
                ids = torch.from_numpy(ref[:, -1].argmax(-1)).view(batch, 1)
            worst.cases.append(f"b{batch}-p{length}")
    tol = TOLERANCE.get(dtype)
    log.info("validation (%s): max |dlogit| %.3g (relative %.3g) at %s; %d argmax mismatches over %d positions",
             dtype, worst.max_abs_diff, worst.rel_diff, worst.where(), worst.argmax_mismatches,
             worst.compared_positions)
    if tol is not None and worst.rel_diff > tol:
        raise ValidationError(
            f"ONNX Runtime logits differ from PyTorch: max |dlogit| {worst.max_abs_diff:.4g} "
            f"(relative {worst.rel_diff:.4g} > tolerance {tol:g} for {dtype}) at {worst.where()}")
    return worst


def worst_as_dict(worst: Worst) -> dict[str, Any]:
    d = asdict(worst)
    d["where"] = worst.where()
    return d
