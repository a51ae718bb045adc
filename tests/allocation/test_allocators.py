import pytest
import torch

from factorlm.compressor.allocation import ALLOCATORS, AllocationInputs, AraConfig, allocate, plan_cost
from factorlm.compressor.allocation.ara import expected_rank, monotone_mask, train_ara
from factorlm.compressor.allocation.core import LayerSpectrum
from factorlm.compressor.allocation.mgaa import split_budget, sublayer_importance
from factorlm.compressor.budget import LayerShape
from factorlm.runtime.arch import compressible_linears
from factorlm.runtime.checkpoint import factorize_model
from factorlm.runtime.format import FactorlmError
from factorlm.testing import make_tiny_model

TRAINING_FREE = ["uniform", "energy", "greedy", "mgaa"]


def planted_spectra(flat_layer: bool = True) -> dict[str, LayerSpectrum]:
    """Six 128x128 layers with fast-decaying spectra, plus one flat (incompressible) layer."""
    spectra = {}
    for i in range(6):
        energy = torch.exp(-torch.arange(128, dtype=torch.float64) / (6 + 3 * i))
        spectra[f"l{i}"] = LayerSpectrum(f"l{i}", LayerShape(128, 128), energy, sublayer=f"s{i // 2}")
    if flat_layer:
        spectra["flat"] = LayerSpectrum("flat", LayerShape(128, 128), torch.ones(128, dtype=torch.float64), "s9")
    return spectra


def inputs(spectra, keep, **kw):
    total = sum(s.shape.dense_params for s in spectra.values())
    importance = {s.sublayer: 0.1 + 0.05 * j for j, s in enumerate(spectra.values())}
    return AllocationInputs(spectra=spectra, budget=int(keep * total), importance=importance, **kw)


@pytest.mark.parametrize("name", TRAINING_FREE)
@pytest.mark.parametrize("keep", [0.3, 0.5, 0.7])
def test_budget_met_within_one_rank_multiple(name, keep):
    spectra = planted_spectra()
    x = inputs(spectra, keep)
    plan = allocate(name, x)
    cost = plan_cost(spectra, plan)
    step = 8 * 256  # one rank multiple of one 128x128 layer
    assert abs(cost - x.budget) <= step * (len(spectra) if name == "uniform" else 2), (cost, x.budget)
    if name != "uniform":
        assert cost <= x.budget
    assert all(r is None or (r % 8 == 0 and r >= 8) for r in plan.values())


@pytest.mark.parametrize("name", ["energy", "greedy", "mgaa"])
def test_monotone_in_budget(name):
    spectra = planted_spectra()
    costs = [plan_cost(spectra, allocate(name, inputs(spectra, k))) for k in (0.2, 0.35, 0.5, 0.65, 0.8)]
    assert costs == sorted(costs)


def test_greedy_keeps_incompressible_layer_dense():
    """A flat spectrum loses in proportion to the rank cut: the budget is better spent elsewhere."""
    spectra = planted_spectra()
    plan = allocate("greedy", inputs(spectra, 0.45))
    assert plan["flat"] is None
    assert all(plan[f"l{i}"] is not None for i in range(6))


@pytest.mark.parametrize("name", TRAINING_FREE)
def test_layer_past_break_even_is_listed_dense(name):
    """A 16x16 layer cannot be factored below break-even at rank multiple 8: every allocator keeps it dense."""
    spectra = planted_spectra(flat_layer=False)
    spectra["small"] = LayerSpectrum("small", LayerShape(16, 16), torch.ones(16, dtype=torch.float64), "s8")
    plan = allocate(name, inputs(spectra, 0.5))
    assert plan["small"] is None


def test_energy_equalises_retention():
    spectra = planted_spectra(flat_layer=False)
    plan = allocate("energy", inputs(spectra, 0.4))
    tau = min(1 - spectra[n].tail_fraction(r) for n, r in plan.items())
    # every layer sits at the smallest rank (in steps of 8) that retains the common fraction
    for n, r in plan.items():
        assert r == 8 or 1 - spectra[n].tail_fraction(r - 8) < tau


@pytest.mark.parametrize("name", TRAINING_FREE)
def test_deterministic(name):
    a = allocate(name, inputs(planted_spectra(), 0.5))
    b = allocate(name, inputs(planted_spectra(), 0.5))
    assert a == b


def test_impossible_budget_is_explained():
    spectra = planted_spectra()
    with pytest.raises(FactorlmError, match="cannot be met: even rank 8 everywhere keeps"):
        allocate("greedy", inputs(spectra, 0.01))


def test_unknown_allocator_lists_available():
    with pytest.raises(FactorlmError, match="available: uniform, energy, greedy, mgaa, ara"):
        allocate("nope", inputs(planted_spectra(), 0.5))


def test_mask_is_monotone_and_expected_rank_matches():
    theta = torch.randn(3, 50)
    m = monotone_mask(theta)
    assert torch.all(m[:, 1:] <= m[:, :-1] + 1e-7)
    torch.testing.assert_close(m[:, 0], torch.ones(3))
    p = torch.softmax(theta, -1)
    torch.testing.assert_close(expected_rank(theta), (p * torch.arange(1, 51)).sum(-1))


def test_split_budget_respects_bounds_and_total():
    shares = split_budget({"a": 1.0, "b": 0.1, "c": 0.5}, {"a": 10, "b": 10, "c": 10}, {"a": 100, "b": 100, "c": 100}, 150)
    assert sum(shares.values()) <= 150 and all(10 <= v <= 100 for v in shares.values())
    assert shares["a"] >= shares["c"] >= shares["b"]


def test_sublayer_importance():
    h = torch.randn(10, 16)
    assert sublayer_importance(h, h) == pytest.approx(0.0, abs=1e-9)
    assert sublayer_importance(h, -h) == pytest.approx(2.0)


def tiny_model_spectra(model):
    spectra, factors = {}, {}
    for name, lin in compressible_linears(model).items():
        u, s, vh = torch.linalg.svd(lin.weight.detach().double(), full_matrices=False)
        shape = LayerShape(lin.out_features, lin.in_features)
        spectra[name] = LayerSpectrum(name, shape, s**2, sublayer=name.rsplit(".", 1)[0])
        factors[name] = ((u * s).float(), vh.float(), lin.bias)
    return spectra, factors


@pytest.mark.parametrize("name", list(ALLOCATORS))
def test_each_allocator_end_to_end_on_tiny_model(name):
    model, tok = make_tiny_model("llama", hidden_size=128, intermediate_size=256, head_dim=32)
    spectra, factors = tiny_model_spectra(model)
    batches = [tok("The quick brown fox jumps over the lazy dog. " * 3, return_tensors="pt").input_ids]
    x = inputs(spectra, 0.5, model=model, factors=factors, batches=batches,
               ara=AraConfig(steps=4), progress=False)
    x.importance = {s.sublayer: 0.2 for s in spectra.values()}
    before = model(batches[0]).logits
    plan = allocate(name, x)
    assert plan_cost(spectra, plan) <= x.budget * 1.05
    torch.testing.assert_close(model(batches[0]).logits, before)  # ARA restores the model
    factorize_model(model, {n: r for n, r in plan.items() if r is not None})
    assert torch.isfinite(model(batches[0]).logits).all()
    if name == "ara":
        assert len(x.history) == 4 and all(torch.isfinite(torch.tensor(r["task"])) for r in x.history)


def test_ara_training_moves_toward_budget():
    model, tok = make_tiny_model("llama", hidden_size=128, intermediate_size=256, head_dim=32)
    spectra, factors = tiny_model_spectra(model)
    batches = [tok("Paris is the capital of France. " * 4, return_tensors="pt").input_ids]
    budget = int(0.4 * sum(s.shape.dense_params for s in spectra.values()))
    plan, history = train_ara(model, factors, spectra, budget, batches, AraConfig(steps=6, lr=0.1), progress=False)
    assert plan_cost(spectra, plan) <= budget
    assert history[-1]["task"] >= 0
