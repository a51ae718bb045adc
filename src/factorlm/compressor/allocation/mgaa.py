"""MGAA: training-free multi-granular allocation (arXiv 2507.03294).

Between sublayers: a sublayer that barely changes its input (high cosine similarity
between its input and output hidden states) matters less and is compressed more.
Within a sublayer: its matrices keep equal fractions of whitened singular-value energy.

The paper's exact mapping from similarity to ratio is not public; we use importance
s_j = 1 - mean cos(h_in, h_out), sublayer keep ρ_j ∝ s_j^alpha rescaled to the global
budget, then clipped to what each sublayer can actually spend (its cheapest plan .. dense)
with the excess redistributed. Documented as a reconstruction.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .core import LayerSpectrum, Plan, allocate_energy, check_budget, min_cost


def sublayer_importance(h_in: torch.Tensor, h_out: torch.Tensor) -> float:
    """1 - mean cosine similarity between a sublayer's input and output hidden states [tokens, hidden]."""
    cos = torch.nn.functional.cosine_similarity(h_in.double().flatten(0, -2), h_out.double().flatten(0, -2), dim=-1)
    return float(1.0 - cos.mean())


def split_budget(
    importance: Mapping[str, float], floors: Mapping[str, int], ceilings: Mapping[str, int], budget: int,
    alpha: float = 1.0,
) -> dict[str, int]:
    """Share ``budget`` among sublayers ∝ importance^alpha × size, within [floor, ceiling] each.

    Water-filling: sublayers pinned at a bound are removed and the rest re-shared until
    every share fits. Deterministic; the result sums to min(budget, Σ ceilings).
    """
    names = list(ceilings)
    weights = {n: max(float(importance.get(n, 0.0)), 1e-6) ** alpha * ceilings[n] for n in names}
    shares: dict[str, int] = {}
    free = list(names)
    remaining = budget
    while free:
        total_w = sum(weights[n] for n in free)
        proposal = {n: remaining * weights[n] / total_w for n in free}
        pinned = [n for n in free if proposal[n] < floors[n] or proposal[n] > ceilings[n]]
        if not pinned:
            shares.update({n: int(proposal[n]) for n in free})
            break
        for n in pinned:
            shares[n] = floors[n] if proposal[n] < floors[n] else ceilings[n]
            remaining -= shares[n]
            free.remove(n)
    return shares


def allocate_mgaa(
    spectra: Mapping[str, LayerSpectrum], budget: int, importance: Mapping[str, float],
    multiple: int = 8, min_rank: int = 8, alpha: float = 1.0,
) -> Plan:
    """MGAA plan: sublayer budgets from importance, equal energy retention inside each sublayer."""
    check_budget(spectra, budget, multiple, min_rank)
    groups: dict[str, dict[str, LayerSpectrum]] = {}
    for name, s in spectra.items():
        groups.setdefault(s.sublayer or name, {})[name] = s
    floors = {g: min_cost(members, multiple, min_rank) for g, members in groups.items()}
    ceilings = {g: sum(s.shape.dense_params for s in members.values()) for g, members in groups.items()}
    shares = split_budget(importance, floors, ceilings, budget, alpha)
    plan: Plan = {}
    for g, members in groups.items():
        plan.update(allocate_energy(members, max(shares[g], floors[g]), multiple, min_rank))
    return {n: plan[n] for n in spectra}
