import pytest

from factorlm.compressor.budget import LayerShape, is_worth_factoring, kept_params, round_rank, uniform_ranks
from factorlm.runtime.format import FactorlmError

SHAPES = {"a": LayerShape(576, 576), "b": LayerShape(1536, 576), "c": LayerShape(192, 576)}


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.8])
def test_uniform_budget_met_within_one_rank_multiple(keep):
    plan = uniform_ranks(SHAPES, keep, multiple=8)
    target = keep * sum(s.dense_params for s in SHAPES.values())
    slack = sum(8 * (s.out_features + s.in_features) for s in SHAPES.values()) / 2
    assert abs(kept_params(SHAPES, plan) - target) <= slack
    assert all(r is None or r % 8 == 0 for r in plan.values())


def test_break_even_guard_keeps_dense():
    shape = LayerShape(16, 16)  # break-even rank 8
    assert not is_worth_factoring(shape, 8)
    assert is_worth_factoring(shape, 7)
    assert uniform_ranks({"x": shape}, 0.99, multiple=8) == {"x": None}


def test_round_rank_respects_minimum():
    assert round_rank(3.2, 8, 8) == 8
    assert round_rank(13, 8, 8) == 16


@pytest.mark.parametrize("keep", [0, -0.1, 1.2, float("nan")])
def test_bad_keep(keep):
    with pytest.raises(FactorlmError, match="--keep must be in"):
        uniform_ranks(SHAPES, keep)
