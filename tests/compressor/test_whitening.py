"""Planted problems for the factorization math."""

import torch

from factorlm.compressor.whitening import (
    accumulate_cross, accumulate_gram, aces_beta, asvd_factors, cealc_objective, saes_factors, svd_factors,
    svdllm_factors, whiten,
)

torch.manual_seed(0)


def _data(n=400, d_in=24, d_out=16):
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    xs = torch.randn(n, d_in, generator=g, dtype=torch.float64) @ mix
    xt = xs + 0.3 * torch.randn(n, d_in, generator=g, dtype=torch.float64) @ mix
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    return w, xs, xt


def test_whitened_truncation_error_equals_discarded_singular_values():
    w, xs, _ = _data()
    gram = accumulate_gram(None, xs)
    white = whiten(gram, damping=0.0)
    assert white.fallback is None
    a, b, s = svdllm_factors(w, white, rank=6)
    err = ((xs @ (w - a @ b).T) ** 2).sum()
    assert torch.allclose(err, (s[6:] ** 2).sum(), rtol=1e-8)


def test_planted_low_rank_is_recovered_exactly():
    w, xs, _ = _data()
    planted = w[:, :4] @ torch.randn(4, w.shape[1], dtype=torch.float64)
    white = whiten(accumulate_gram(None, xs), damping=0.0)
    for a, b in (svd_factors(planted, 4), svdllm_factors(planted, white, 4)[:2],
                 asvd_factors(planted, xs.abs().mean(0), 4)):
        assert torch.allclose(a @ b, planted, atol=1e-8)


def test_saes_beta_zero_equals_svdllm():
    w, xs, xt = _data()
    gram, cross = accumulate_gram(None, xs), accumulate_cross(None, xt, xs)
    white = whiten(gram)
    a0, b0, _ = saes_factors(w, gram, cross, white, 5, beta=0.0)
    a1, b1, _ = svdllm_factors(w, white, 5)
    assert torch.allclose(a0 @ b0, a1 @ b1, atol=1e-10)


def test_compensated_objective_never_worse_than_svdllm():
    w, xs, xt = _data()
    gram, cross = accumulate_gram(None, xs), accumulate_cross(None, xt, xs)
    white = whiten(gram, damping=0.0)
    base_a, base_b, _ = svdllm_factors(w, white, 5)
    for alpha in (0.1, 1.0, 4.0):
        beta = alpha / (1 + alpha)
        a, b, _ = saes_factors(w, gram, cross, white, 5, beta=beta)
        assert cealc_objective(a @ b, w, xs, xt, alpha) <= cealc_objective(base_a @ base_b, w, xs, xt, alpha) * (1 + 1e-9)


def test_aces_returns_grid_beta():
    w, xs, xt = _data()
    gram, cross = accumulate_gram(None, xs), accumulate_cross(None, xt, xs)
    beta, rho = aces_beta(w, gram, cross, whiten(gram), 5)
    assert 0.0 <= beta <= 0.9 and 0.0 < rho <= 1.0


def test_singular_gram_falls_back_and_is_reported():
    xs = torch.randn(5, 12, dtype=torch.float64)  # 5 tokens, 12 channels: rank-5 Gram
    xs[:, 3] = 0.0
    white = whiten(accumulate_gram(None, xs), damping=0.0)
    assert white.fallback is not None and "eigh" in white.fallback
    assert torch.isfinite(white.inv_sqrt).all()


def test_gqa_shapes():
    d_model, kv_out = 32, 8  # k/v projections of a GQA layer are narrower than q
    w = torch.randn(kv_out, d_model, dtype=torch.float64)
    xs = torch.randn(100, d_model, dtype=torch.float64)
    a, b, _ = svdllm_factors(w, whiten(accumulate_gram(None, xs)), 4)
    assert a.shape == (kv_out, 4) and b.shape == (4, d_model)
