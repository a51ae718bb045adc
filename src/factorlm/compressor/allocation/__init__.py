"""Rank allocators behind one registry, selected by ``--allocation``.

All take the same :class:`AllocationInputs` and return ``{module: rank or None (dense)}``.
Each registry entry declares what it needs (:data:`NEEDS`), so the pipeline computes only
that: per-layer spectra, sublayer importance, the singular factors, calibration batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ...runtime.format import FactorlmError
from .ara import AraConfig, train_ara
from ..budget import LayerShape
from .core import LayerSpectrum, Plan, allocate_energy, allocate_greedy, allocate_uniform, plan_cost
from .mgaa import allocate_mgaa, sublayer_importance


@dataclass
class AllocationInputs:
    """Everything an allocator may use. ``importance`` feeds MGAA; ``model``/``factors``/``batches`` feed ARA.

    ``shapes`` is all ``uniform`` needs; when only ``spectra`` are given it is read from them.
    """

    spectra: Mapping[str, LayerSpectrum] | None = None
    budget: int = 0
    multiple: int = 8
    min_rank: int = 8
    importance: Mapping[str, float] | None = None
    model: Any = None
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None = None
    batches: Iterable[torch.Tensor] | None = None
    ara: AraConfig = field(default_factory=AraConfig)
    progress: bool = True
    history: list[dict[str, float]] = field(default_factory=list)
    shapes: Mapping[str, LayerShape] | None = None

    def layer_shapes(self) -> Mapping[str, LayerShape]:
        if self.shapes is not None:
            return self.shapes
        return {n: s.shape for n, s in self._spectra().items()}

    def _spectra(self) -> Mapping[str, LayerSpectrum]:
        if self.spectra is None:
            raise FactorlmError("this allocation needs the layers' spectra")
        return self.spectra


# what an allocator may need, beyond layer shapes and the budget:
#   spectra: per-layer (whitened) singular-value energies; importance: per-sublayer input/output
#   cosine similarity; factors: per-layer singular factors; batches: calibration batches to train on
NEEDS = ("spectra", "importance", "factors", "batches")
# needs that only calibration data can provide (spectra come from the weights alone when the method is svd)
CALIBRATED_NEEDS = frozenset({"importance", "factors", "batches"})


@dataclass(frozen=True)
class Allocator:
    """A registry entry: the allocator and, as data, what it needs computed before it runs."""

    name: str
    run: Callable[[AllocationInputs], Plan]
    needs: frozenset[str] = frozenset()
    description: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"allocator {self.name!r} declares unknown needs {sorted(unknown)}; known: {NEEDS}")

    def __call__(self, inputs: AllocationInputs) -> Plan:
        return self.run(inputs)

    @property
    def needs_calibration(self) -> bool:
        """Whether calibration data is needed whatever the method (spectra alone can come from weights)."""
        return bool(self.needs & CALIBRATED_NEEDS)


def _uniform(x: AllocationInputs) -> Plan:
    return allocate_uniform(x.layer_shapes(), x.budget, x.multiple, x.min_rank)


def _energy(x: AllocationInputs) -> Plan:
    return allocate_energy(x._spectra(), x.budget, x.multiple, x.min_rank)


def _greedy(x: AllocationInputs) -> Plan:
    return allocate_greedy(x._spectra(), x.budget, x.multiple, x.min_rank)


def _mgaa(x: AllocationInputs) -> Plan:
    if x.importance is None:
        raise FactorlmError("mgaa needs sublayer importance (cosine similarity of sublayer inputs and outputs)")
    return allocate_mgaa(x._spectra(), x.budget, x.importance, x.multiple, x.min_rank)


def _ara(x: AllocationInputs) -> Plan:
    if x.model is None or x.factors is None or x.batches is None:
        raise FactorlmError("ara needs the model, per-layer singular factors and calibration batches")
    plan, history = train_ara(x.model, x.factors, x._spectra(), x.budget, x.batches, x.ara, x.multiple, x.min_rank,
                              x.progress)
    x.history.extend(history)
    return plan


ALLOCATORS: dict[str, Allocator] = {a.name: a for a in (
    Allocator("uniform", _uniform, frozenset(), "every layer keeps the same fraction of its parameters"),
    Allocator("energy", _energy, frozenset({"spectra"}), "every layer keeps the same fraction of its whitened energy"),
    Allocator("greedy", _greedy, frozenset({"spectra"}), "global truncation by whitened loss per parameter"),
    Allocator("mgaa", _mgaa, frozenset({"spectra", "importance"}),
              "MGAA: sublayer budgets from input/output similarity, then energy within each"),
    Allocator("ara", _ara, frozenset({"spectra", "factors", "batches"}),
              "ARA: rank masks trained through the model on the KL to the dense outputs"),
)}


def get_allocator(name: str) -> Allocator:
    """The registered allocator ``name``; an unknown name lists the available ones."""
    if name not in ALLOCATORS:
        raise FactorlmError(f"unknown allocation {name!r}; available: {', '.join(ALLOCATORS)}")
    return ALLOCATORS[name]


def allocate(name: str, inputs: AllocationInputs) -> Plan:
    """Run the allocator ``name``; unknown names list the available ones."""
    return get_allocator(name).run(inputs)


__all__ = [
    "ALLOCATORS",
    "NEEDS",
    "AllocationInputs",
    "Allocator",
    "AraConfig",
    "LayerSpectrum",
    "Plan",
    "allocate",
    "get_allocator",
    "plan_cost",
    "sublayer_importance",
]
