"""Parameter budgets: from a keep ratio to per-layer ranks, with break-even and rounding.

A dense [m, n] layer costs m*n parameters; a rank-r factorization costs r*(m+n). At or
above the break-even rank r* = m*n/(m+n) factoring saves nothing, so such a layer stays
dense. Ranks are rounded to a multiple (default 8) to keep GEMMs aligned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from ..runtime.format import FactorlmError


@dataclass(frozen=True)
class LayerShape:
    """Output and input features of a linear layer."""

    out_features: int
    in_features: int

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    def factored_params(self, rank: int) -> int:
        return rank * (self.out_features + self.in_features)

    @property
    def break_even(self) -> float:
        return self.dense_params / (self.out_features + self.in_features)

    @property
    def max_rank(self) -> int:
        return min(self.out_features, self.in_features)


def round_rank(rank: float, multiple: int, min_rank: int) -> int:
    """Round to the nearest multiple (never below ``min_rank``)."""
    rounded = int(round(rank / multiple)) * multiple if multiple > 1 else int(round(rank))
    return max(rounded, min_rank)


def is_worth_factoring(shape: LayerShape, rank: int) -> bool:
    """The break-even guard: factoring must store strictly fewer parameters than dense."""
    return 1 <= rank <= shape.max_rank and shape.factored_params(rank) < shape.dense_params


def validate_keep(keep: float) -> None:
    """A keep ratio is a fraction of linear-layer parameters in (0, 1]."""
    if not (isinstance(keep, (int, float)) and math.isfinite(keep) and 0 < keep <= 1):
        raise FactorlmError(f"--keep must be in (0, 1] (fraction of linear-layer parameters kept), got {keep!r}")


def uniform_ranks(
    shapes: Mapping[str, LayerShape], keep: float, multiple: int = 8, min_rank: int | None = None
) -> dict[str, int | None]:
    """Every layer keeps the same fraction ``keep`` of its parameters.

    Returns fqn -> rank, or None where the rounded rank would not beat break-even (the
    layer stays dense).
    """
    validate_keep(keep)
    min_rank = multiple if min_rank is None else min_rank
    plan: dict[str, int | None] = {}
    for name, shape in shapes.items():
        rank = round_rank(keep * shape.break_even, multiple, min_rank)
        plan[name] = rank if is_worth_factoring(shape, rank) else None
    return plan


def kept_params(shapes: Mapping[str, LayerShape], plan: Mapping[str, int | None]) -> int:
    """Linear-layer parameters after applying ``plan`` (dense layers count in full)."""
    return sum(shapes[n].dense_params if r is None else shapes[n].factored_params(r) for n, r in plan.items())


def shapes_of(modules: Mapping[str, nn.Module]) -> dict[str, LayerShape]:
    """LayerShape of every linear in a name -> module mapping."""
    return {name: LayerShape(m.out_features, m.in_features) for name, m in modules.items()}


def count_params(model: nn.Module) -> int:
    """Unique parameters of a model (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total
