"""Extension point of the block-wise compressor: work done on a block after it is factorized.

The streaming compressor processes one decoder block at a time. After it has replaced the
block's linears by their factorizations, and before it advances the student stream through
the block, it calls every :class:`BlockHook` with a :class:`BlockContext`. A hook may change
the compressed block in place (for example swap a factored linear for a module with trained
correctors, or retrain the factors) and returns extra report fields per layer.

After the last block the compressor calls ``finalize(model, calib_ids)`` on every hook.
Hooks also declare how many parameters they will add (``reserved_params``), so the rank
allocator leaves that part of the budget free: everything a hook adds counts in ``--keep`` /
``--reduction``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class BlockContext:
    """What a hook sees of one block.

    ``student_inputs`` / ``teacher_inputs`` hold the block's input hidden states, one tensor
    [batch, seq, hidden] per calibration batch: the student stream carries the error of the
    blocks compressed so far, the teacher stream is the dense model's. ``block_kwargs`` are
    the keyword arguments the block's forward needs (position embeddings, attention mask,
    ...), identical for both streams. ``linear_names`` maps a linear's name inside the block
    (e.g. ``self_attn.q_proj``) to its full module name in the model. ``grams`` holds, when
    the compressor kept them, the fp64 Gram of each linear's student-stream inputs keyed by
    the in-block name. ``dense_block`` is the teacher: an unmodified copy of the block.
    """

    index: int
    num_blocks: int
    block: nn.Module
    dense_block: nn.Module
    student_inputs: list[torch.Tensor]
    teacher_inputs: list[torch.Tensor]
    block_kwargs: dict[str, Any]
    linear_names: dict[str, str]
    ranks: dict[str, int | None]
    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


class BlockHook(Protocol):
    """A step run on every block after factorization (see the module docstring)."""

    def reserved_params(self, shapes: dict[str, tuple[int, int]]) -> int:
        """Parameters this hook will add over the whole model, given ``{module: (out, in)}``."""
        ...

    def __call__(self, ctx: BlockContext) -> dict[str, dict[str, Any]]:
        """Process one block in place; return ``{full module name: report fields}``."""
        ...

    def finalize(self, model: nn.Module, calib_ids: torch.Tensor) -> dict[str, Any]:
        """Called once after the last block, before saving: whole-model work (e.g. distillation
        against the dense model) and folding, so that the saved model holds only ``nn.Linear``
        and ``FactoredLinear`` modules. Returns report fields for the totals."""
        ...
