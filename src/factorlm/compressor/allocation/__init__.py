"""Rank allocators behind one registry, selected by ``--allocation``.

All take the same :class:`AllocationInputs` and return ``{module: rank or None (dense)}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ...runtime.format import FactorlmError
from .ara import AraConfig, train_ara
from .core import LayerSpectrum, Plan, allocate_energy, allocate_greedy, allocate_uniform, plan_cost
from .mgaa import allocate_mgaa, sublayer_importance


@dataclass
class AllocationInputs:
    """Everything an allocator may use. ``importance`` feeds MGAA; ``model``/``factors``/``batches`` feed ARA."""

    spectra: Mapping[str, LayerSpectrum]
    budget: int
    multiple: int = 8
    min_rank: int = 8
    importance: Mapping[str, float] | None = None
    model: Any = None
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None = None
    batches: Iterable[torch.Tensor] | None = None
    ara: AraConfig = field(default_factory=AraConfig)
    progress: bool = True
    history: list[dict[str, float]] = field(default_factory=list)


def _uniform(x: AllocationInputs) -> Plan:
    return allocate_uniform(x.spectra, x.budget, x.multiple, x.min_rank)


def _energy(x: AllocationInputs) -> Plan:
    return allocate_energy(x.spectra, x.budget, x.multiple, x.min_rank)


def _greedy(x: AllocationInputs) -> Plan:
    return allocate_greedy(x.spectra, x.budget, x.multiple, x.min_rank)


def _mgaa(x: AllocationInputs) -> Plan:
    if x.importance is None:
        raise FactorlmError("mgaa needs sublayer importance (cosine similarity of sublayer inputs and outputs)")
    return allocate_mgaa(x.spectra, x.budget, x.importance, x.multiple, x.min_rank)


def _ara(x: AllocationInputs) -> Plan:
    if x.model is None or x.factors is None or x.batches is None:
        raise FactorlmError("ara needs the model, per-layer singular factors and calibration batches")
    plan, history = train_ara(x.model, x.factors, x.spectra, x.budget, x.batches, x.ara, x.multiple, x.min_rank,
                              x.progress)
    x.history.extend(history)
    return plan


ALLOCATORS: dict[str, Callable[[AllocationInputs], Plan]] = {
    "uniform": _uniform,
    "energy": _energy,
    "greedy": _greedy,
    "mgaa": _mgaa,
    "ara": _ara,
}


def allocate(name: str, inputs: AllocationInputs) -> Plan:
    """Run the allocator ``name``; unknown names list the available ones."""
    if name not in ALLOCATORS:
        raise FactorlmError(f"unknown allocation {name!r}; available: {', '.join(ALLOCATORS)}")
    return ALLOCATORS[name](inputs)


__all__ = [
    "ALLOCATORS",
    "AllocationInputs",
    "AraConfig",
    "LayerSpectrum",
    "Plan",
    "allocate",
    "plan_cost",
    "sublayer_importance",
]
