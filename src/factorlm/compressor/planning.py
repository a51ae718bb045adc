"""From a budget (``--keep`` or ``--reduction``) to a rank plan, through the allocators.

Two budget views (papers use "ratio" in opposite senses):

* ``keep``: the fraction of *linear-layer* parameters kept;
* ``reduction``: the fraction of *whole-model* parameters removed, embeddings included (as
  CALR counts). Only linear layers shrink, so it converts to a linear budget
  ``(1 − reduction)·P_model − P_other``; a reduction that linear layers alone cannot reach
  is an error that says how far they can go.

Hooks may reserve parameters (e.g. correctors); they come out of the linear budget before
allocation, so everything the saved model holds counts. What an allocator needs computed
first (spectra, importance, factors, batches) is declared by its registry entry
(:data:`.allocation.ALLOCATORS`); the planner asks the registry and passes what it was given.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..runtime.format import FactorlmError
from .allocation import AllocationInputs, AraConfig, LayerSpectrum, Plan, get_allocator
from .allocation.core import min_cost
from .budget import LayerShape

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Budget:
    """The linear-parameter budget the allocator must meet, and how it was derived."""

    linear_total: int
    model_total: int
    target: int
    reserved: int

    @property
    def allocatable(self) -> int:
        return self.target - self.reserved

    def to_dict(self) -> dict[str, Any]:
        return {"linear_params_total": self.linear_total, "model_params_total": self.model_total,
                "linear_budget": self.target, "reserved_params": self.reserved, "allocatable": self.allocatable}


def linear_budget(shapes: Mapping[str, LayerShape], model_params: int, *, keep: float | None = None,
                  reduction: float | None = None, reserved: int = 0) -> Budget:
    """Linear-parameter budget from exactly one of ``keep`` / ``reduction``, minus ``reserved``."""
    if (keep is None) == (reduction is None):
        raise FactorlmError("give exactly one of --keep (linear params kept) and --reduction (model params removed)")
    linear_total = sum(s.dense_params for s in shapes.values())
    if keep is not None:
        if not (math.isfinite(keep) and 0 < keep <= 1):
            raise FactorlmError(f"--keep must be in (0, 1] (fraction of linear-layer parameters kept), got {keep!r}")
        target = int(keep * linear_total)
    else:
        assert reduction is not None
        if not (math.isfinite(reduction) and 0 <= reduction < 1):
            raise FactorlmError(f"--reduction must be in [0, 1) (fraction of model parameters removed), got {reduction!r}")
        other = model_params - linear_total
        target = int((1 - reduction) * model_params) - other
        if target <= 0:
            raise FactorlmError(
                f"--reduction {reduction:g} cannot be met by factorizing linear layers alone: the other "
                f"parameters (embeddings, norms) are {other:,} = {other / model_params:.1%} of the model, so at "
                f"most {linear_total / model_params:.1%} can be removed"
            )
        target = min(target, linear_total)
    if reserved < 0:
        raise FactorlmError(f"reserved parameters must be >= 0, got {reserved}")
    if reserved >= target:
        raise FactorlmError(f"block hooks reserve {reserved:,} parameters, the whole linear budget of {target:,}")
    return Budget(linear_total, model_params, target, reserved)


def check_feasible(shapes: Mapping[str, LayerShape], budget: Budget, multiple: int, min_rank: int) -> None:
    """Fail before any work when even the smallest ranks exceed the budget."""
    spectra = {n: LayerSpectrum(n, s, torch.ones(s.max_rank)) for n, s in shapes.items()}
    floor = min_cost(spectra, multiple, min_rank)
    if budget.allocatable < floor:
        raise FactorlmError(
            f"budget of {budget.allocatable:,} linear parameters ({budget.allocatable / budget.linear_total:.1%}) "
            f"cannot be met: even rank {max(min_rank, multiple)} everywhere keeps {floor:,} "
            f"({floor / budget.linear_total:.1%}); lower --min-rank or --rank-multiple, or raise the budget"
        )


def plan_ranks(
    allocation: str, shapes: Mapping[str, LayerShape], budget: Budget, multiple: int, min_rank: int, *,
    spectra: Mapping[str, LayerSpectrum] | None = None, importance: Mapping[str, float] | None = None,
    model: Any = None, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None = None,
    batches: Sequence[torch.Tensor] | None = None, ara: AraConfig | None = None, progress: bool = True,
) -> tuple[Plan, dict[str, Any]]:
    """Run the allocator ``allocation``; returns the plan and report fields (e.g. ARA's loss history)."""
    allocator = get_allocator(allocation)
    check_feasible(shapes, budget, multiple, min_rank)
    given = {"spectra": spectra, "importance": importance, "factors": factors, "batches": batches}
    missing = [need for need in sorted(allocator.needs) if given[need] is None]
    if missing:
        raise FactorlmError(f"allocation {allocation!r} needs {', '.join(missing)}, which were not computed")
    inputs = AllocationInputs(spectra=spectra, budget=budget.allocatable, multiple=multiple, min_rank=min_rank,
                              importance=importance, model=model, factors=factors, batches=batches,
                              ara=ara or AraConfig(), progress=progress, shapes=shapes)
    plan = allocator.run(inputs)
    info: dict[str, Any] = {}
    if importance:
        info["sublayer_importance"] = {k: round(v, 6) for k, v in importance.items()}
    if inputs.history:
        first, last = inputs.history[0], inputs.history[-1]
        info["ara"] = {"steps": len(inputs.history), "kl_first": first["task"], "kl_last": last["task"],
                       "cost_ratio_last": last["cost_ratio"]}
    return {n: plan[n] for n in shapes}, info
