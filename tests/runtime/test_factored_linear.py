import pytest
import torch
from torch import nn

from factorlm.runtime.factored_linear import FactoredLinear, break_even_rank, truncated_svd_factors
from factorlm.runtime.format import FactorlmError


def test_full_rank_equals_dense():
    torch.manual_seed(0)
    linear = nn.Linear(24, 16, bias=True)
    layer = FactoredLinear.from_linear(linear, rank=16)
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(layer(x), linear(x), atol=1e-5, rtol=1e-5)


def test_truncation_error_is_discarded_singular_values():
    torch.manual_seed(0)
    w = torch.randn(20, 12, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    u, v = truncated_svd_factors(w, 5)
    err = torch.linalg.norm(w - u @ v)
    torch.testing.assert_close(err, s[5:].square().sum().sqrt())


def test_to_dense_round_trip():
    torch.manual_seed(1)
    layer = FactoredLinear.from_linear(nn.Linear(10, 8), rank=3)
    x = torch.randn(4, 10)
    torch.testing.assert_close(layer.to_dense()(x), layer(x), atol=1e-5, rtol=1e-5)


def test_rank_above_min_dim_is_rejected():
    with pytest.raises(FactorlmError, match="rank 9 is out of range"):
        FactoredLinear.from_linear(nn.Linear(8, 12), rank=9)


def test_mismatched_factors_are_rejected():
    with pytest.raises(FactorlmError, match="ranks disagree"):
        FactoredLinear.from_factors(torch.zeros(4, 2), torch.zeros(3, 5))


def test_break_even():
    assert break_even_rank(576, 576) == 288
