"""Rank allocation: the shared interface and the training-free allocators.

Every allocator maps per-layer spectra (squared whitened singular values, i.e. how much
calibration output energy each singular direction carries) and a parameter budget to a
plan ``{module: rank or None}``, where None means "keep dense". All of them:

* spend at most the budget (linear-layer parameters, dense layers counted in full),
* consider keeping a layer dense (its cost is m*n and its loss 0), so a layer whose useful
  rank sits at or beyond break-even is listed as dense instead of "almost dense but factored",
* use ranks that are multiples of ``multiple`` and at least ``min_rank``,
* are deterministic (no randomness; ties break by module order).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ...runtime.format import FactorlmError
from ..budget import LayerShape, kept_params, uniform_ranks

Plan = dict[str, "int | None"]


@dataclass(frozen=True)
class LayerSpectrum:
    """One layer as the allocators see it.

    ``energy[j]`` is σ_j² of the whitened weight (descending): dropping direction j adds
    that much squared error to the layer's output on the calibration data.
    ``sublayer`` groups matrices of one attention or MLP sublayer (used by MGAA).
    """

    name: str
    shape: LayerShape
    energy: torch.Tensor
    sublayer: str = ""

    def candidates(self, multiple: int, min_rank: int) -> list[int]:
        """Ranks worth storing: multiples of ``multiple`` from ``min_rank`` up to below break-even."""
        start = max(min_rank, multiple)
        start = int(math.ceil(start / multiple) * multiple)
        limit = min(self.shape.max_rank, len(self.energy))
        return [r for r in range(start, limit + 1, multiple) if self.shape.factored_params(r) < self.shape.dense_params]

    def tail_fraction(self, rank: int) -> float:
        """Fraction of whitened energy discarded at ``rank`` (0 for rank >= full)."""
        total = float(self.energy.sum())
        return 0.0 if total <= 0 else float(self.energy[rank:].sum()) / total

    def rank_for_energy(self, tau: float, candidates: list[int]) -> int | None:
        """Smallest candidate rank that keeps at least ``tau`` of the energy, None if only dense does."""
        cum = torch.cumsum(self.energy.double(), 0)
        total = float(cum[-1]) if len(cum) else 0.0
        for r in candidates:
            if total <= 0 or float(cum[r - 1]) >= tau * total - 1e-12 * total:
                return r
        return None


def plan_cost(spectra: Mapping[str, LayerSpectrum], plan: Mapping[str, int | None]) -> int:
    """Linear-layer parameters a plan keeps."""
    return sum(
        spectra[n].shape.dense_params if r is None else spectra[n].shape.factored_params(r) for n, r in plan.items()
    )


def min_cost(spectra: Mapping[str, LayerSpectrum], multiple: int, min_rank: int) -> int:
    """The cheapest plan: every layer at its smallest candidate rank (dense where none exists)."""
    plan = {}
    for n, s in spectra.items():
        cands = s.candidates(multiple, min_rank)
        plan[n] = cands[0] if cands else None
    return plan_cost(spectra, plan)


def check_budget(spectra: Mapping[str, LayerSpectrum], budget: int, multiple: int, min_rank: int) -> None:
    """Fail early, with numbers, when no plan can meet the budget."""
    floor = min_cost(spectra, multiple, min_rank)
    if budget < floor:
        total = sum(s.shape.dense_params for s in spectra.values())
        raise FactorlmError(
            f"budget of {budget:,} linear parameters ({budget / total:.1%}) cannot be met: even rank "
            f"{max(min_rank, multiple)} everywhere keeps {floor:,} ({floor / total:.1%}); lower --min-rank "
            "or --rank-multiple, or raise the budget"
        )


def energy_plan(spectra: Mapping[str, LayerSpectrum], tau: float, multiple: int, min_rank: int) -> Plan:
    """Every layer keeps at least ``tau`` of its whitened energy (dense where that needs break-even)."""
    return {n: s.rank_for_energy(tau, s.candidates(multiple, min_rank)) for n, s in spectra.items()}


def bisect_max(feasible: Callable[[float], bool], lo: float, hi: float, iters: int = 60) -> float:
    """Largest x in [lo, hi] with feasible(x), assuming feasibility is monotone (True then False)."""
    if feasible(hi):
        return hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        if feasible(mid):
            lo = mid
        else:
            hi = mid
    return lo


def allocate_energy(spectra: Mapping[str, LayerSpectrum], budget: int, multiple: int = 8, min_rank: int = 8) -> Plan:
    """Equal energy retention: the largest common fraction τ whose plan fits the budget."""
    check_budget(spectra, budget, multiple, min_rank)
    tau = bisect_max(lambda t: plan_cost(spectra, energy_plan(spectra, t, multiple, min_rank)) <= budget, 0.0, 1.0)
    return energy_plan(spectra, tau, multiple, min_rank)


def lagrangian_plan(spectra: Mapping[str, LayerSpectrum], lam: float, multiple: int, min_rank: int) -> Plan:
    """Each layer picks the option minimising relative tail loss + lam * parameters (dense included)."""
    plan: Plan = {}
    for name, s in spectra.items():
        best_r: int | None = None
        best = lam * s.shape.dense_params  # dense: no loss
        cum = torch.cumsum(s.energy.double(), 0)
        total = float(cum[-1]) if len(cum) else 0.0
        for r in s.candidates(multiple, min_rank):
            loss = 0.0 if total <= 0 else (total - float(cum[r - 1])) / total
            value = loss + lam * s.shape.factored_params(r)
            if value < best - 1e-15:
                best, best_r = value, r
        plan[name] = best_r
    return plan


def allocate_greedy(spectra: Mapping[str, LayerSpectrum], budget: int, multiple: int = 8, min_rank: int = 8) -> Plan:
    """Global truncation by whitened loss: spend parameters where they remove the most relative loss.

    Solved as a Lagrangian relaxation (the exact solution of the greedy exchange for convex
    per-layer loss curves): bisection on the price λ of one parameter.
    """
    check_budget(spectra, budget, multiple, min_rank)
    hi = 1.0
    while plan_cost(spectra, lagrangian_plan(spectra, hi, multiple, min_rank)) > budget:
        hi *= 10
        if hi > 1e6:
            break
    # feasible for large λ; find the smallest λ (largest spend) that still fits
    lo_log, hi_log = -30.0, math.log10(hi)
    for _ in range(80):
        mid = (lo_log + hi_log) / 2
        if plan_cost(spectra, lagrangian_plan(spectra, 10**mid, multiple, min_rank)) <= budget:
            hi_log = mid
        else:
            lo_log = mid
    plan = lagrangian_plan(spectra, 10**hi_log, multiple, min_rank)
    return _fill_leftover(spectra, plan, budget, multiple, min_rank)


def _fill_leftover(spectra: Mapping[str, LayerSpectrum], plan: Plan, budget: int, multiple: int, min_rank: int) -> Plan:
    """Spend what the price discretisation left over, one rank step at a time, best gain per parameter first."""
    plan = dict(plan)
    while True:
        left = budget - plan_cost(spectra, plan)
        best_name, best_gain, best_rank = None, 0.0, None
        for name, s in spectra.items():
            r = plan[name]
            if r is None:
                continue
            nxt = r + multiple
            if nxt not in s.candidates(multiple, min_rank):
                continue
            extra = s.shape.factored_params(nxt) - s.shape.factored_params(r)
            if extra > left:
                continue
            gain = (s.tail_fraction(r) - s.tail_fraction(nxt)) / extra
            if gain > best_gain:
                best_name, best_gain, best_rank = name, gain, nxt
        if best_name is None:
            return plan
        plan[best_name] = best_rank


def allocate_uniform(shapes: Mapping[str, LayerShape], budget: int, multiple: int = 8, min_rank: int = 8) -> Plan:
    """Every layer keeps the same fraction of its parameters, rounded to the rank multiple, within the budget.

    The one uniform allocator (``--allocation uniform``). It needs only the layer shapes.
    Rounding up to the multiple may overshoot the budget: the layer that overshoots its own share
    most steps down one multiple at a time until the plan fits (deterministic, first wins ties).
    """
    total = sum(s.dense_params for s in shapes.values())
    keep = min(1.0, budget / total)
    plan = uniform_ranks(shapes, keep, multiple, min_rank)
    while kept_params(shapes, plan) > budget:
        over = {n: shapes[n].factored_params(r) - keep * shapes[n].dense_params
                for n, r in plan.items() if r is not None and r - multiple >= min_rank}
        if not over:
            raise FactorlmError(f"budget of {budget:,} linear parameters cannot be met with uniform ranks")
        worst = max(over, key=lambda n: over[n])
        plan[worst] = plan[worst] - multiple  # type: ignore[operator]
    return plan
