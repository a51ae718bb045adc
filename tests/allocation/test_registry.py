"""What each allocator needs is declared by its registry entry, and the pipeline asks the registry."""

from __future__ import annotations

import pytest
import torch

from factorlm.compressor import ALLOCATORS, NEEDS, CompressionRecipe, needs_calibration
from factorlm.compressor.allocation import AllocationInputs, allocate, plan_cost
from factorlm.compressor.allocation.core import LayerSpectrum
from factorlm.compressor.budget import LayerShape
from factorlm.compressor.planning import linear_budget, plan_ranks


def test_every_entry_declares_known_needs():
    for name, entry in ALLOCATORS.items():
        assert entry.name == name and set(entry.needs) <= set(NEEDS)
    assert ALLOCATORS["uniform"].needs == frozenset()
    assert ALLOCATORS["mgaa"].needs == {"spectra", "importance"}
    assert {"factors", "batches"} <= ALLOCATORS["ara"].needs


@pytest.mark.parametrize("method, allocation, expected", [
    ("svd", "uniform", False), ("svd", "energy", False), ("svd", "greedy", False),  # spectra from the weights
    ("svd", "mgaa", True), ("svd", "ara", True), ("saes", "uniform", True), ("asvd", "energy", True),
])
def test_needs_calibration_follows_the_registries(method, allocation, expected):
    assert needs_calibration(CompressionRecipe(method=method, allocation=allocation)) is expected


def test_corrector_section_needs_calibration():
    assert needs_calibration(CompressionRecipe(method="svd", corrector={"rank": 4}))


def test_one_uniform_allocator_fits_the_budget():
    """The registry's uniform entry and the planner are the same step-down implementation: never over budget."""
    shapes = {f"l{i}": LayerShape(96 + 8 * i, 64) for i in range(5)}
    spectra = {n: LayerSpectrum(n, s, torch.ones(s.max_rank)) for n, s in shapes.items()}
    for keep in (0.3, 0.55, 0.8):
        budget = linear_budget(shapes, sum(s.dense_params for s in shapes.values()), keep=keep)
        planned, _ = plan_ranks("uniform", shapes, budget, 8, 8)
        direct = allocate("uniform", AllocationInputs(shapes=shapes, budget=budget.allocatable))
        via_spectra = allocate("uniform", AllocationInputs(spectra=spectra, budget=budget.allocatable))
        assert planned == direct == via_spectra
        assert plan_cost(spectra, planned) <= budget.allocatable


def test_missing_need_is_named():
    from factorlm.runtime.format import FactorlmError

    shapes = {"l0": LayerShape(128, 128)}
    budget = linear_budget(shapes, 128 * 128, keep=0.5)
    with pytest.raises(FactorlmError, match="allocation 'mgaa' needs importance, spectra"):
        plan_ranks("mgaa", shapes, budget, 8, 8)
