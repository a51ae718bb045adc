"""Quantization math on planted matrices: round trips, error bounds, packing, GPTQ vs RTN."""

from __future__ import annotations

import pytest
import torch

from factorlm.runtime.format import FactorlmError
from factorlm.runtime.quant import (QMAX, QMIN, balance_factors, check_quant_params, dequantize, expand_scales,
                                    output_error, pack_int4, qweight_dtype, qweight_shape, quantize_gptq, quantize_rtn,
                                    refit_u, scales_shape, stored_bytes, stored_to_codes, unpack_int4)


def planted(out_f: int = 48, in_f: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    w[3] *= 50.0  # an outlier row: per-channel scales must keep the other rows precise
    return w


def weighted_error(w: torch.Tensor, back: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """Squared error per row (int8) or per group (int4)."""
    d = (w - back) ** 2
    return d.sum(dim=1) if bits == 8 else d.reshape(w.shape[0], -1, group).sum(dim=2)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 8), (4, 16), (4, 64)])
def test_round_trip_error_bounds(bits, group):
    w = planted()
    q, s = quantize_rtn(w, bits, group, clip=True)
    assert q.dtype == qweight_dtype(bits) and q.shape == qweight_shape(bits, *w.shape)
    assert s.shape == scales_shape(bits, group, *w.shape)
    codes = stored_to_codes(q, bits)
    assert int(codes.min()) >= QMIN[bits] and int(codes.max()) <= QMAX[bits]
    back = dequantize(q, s, bits, group)
    full = expand_scales(s, bits, group, w.shape[1]).abs()
    inside = (w / full).abs() <= QMAX[bits]  # not clipped: within half a step
    assert torch.all((back - w).abs()[inside] <= full[inside] / 2 + 1e-6)
    # the clipping search keeps the best candidate, so it never loses to plain absmax scales
    plain = dequantize(*quantize_rtn(w, bits, group, clip=False), bits, group)
    assert torch.all(weighted_error(w, back, bits, group) <= weighted_error(w, plain, bits, group) * (1 + 1e-6))
    rel = float((back - w).norm() / w.norm())
    assert rel < {8: 0.006, 4: 0.09}[bits], rel


def test_full_range_maps_each_groups_peak_onto_a_level_exactly():
    w = planted()
    q, s = quantize_rtn(w, 4, 16, clip=False)
    codes = stored_to_codes(q, 4)
    assert int(codes.min()) == -8  # the 16th level is used
    back = dequantize(q, s, 4, 16).reshape(48, -1, 16)
    wg = w.reshape(48, -1, 16)
    idx = wg.abs().argmax(dim=2, keepdim=True)
    torch.testing.assert_close(torch.gather(back, 2, idx), torch.gather(wg, 2, idx), rtol=1e-6, atol=0)


def test_int8_exact_on_representable_weights():
    scales = torch.tensor([0.5, 0.25, 2.0])
    codes = torch.tensor([[127, -3, 0, 5], [-128, 1, 2, 3], [10, 127, -4, 0]], dtype=torch.int8)
    w = codes.float() * scales[:, None]
    q, s = quantize_rtn(w, 8)
    assert torch.equal(dequantize(q, s, 8), w)


def test_zero_rows_get_unit_scale_and_zero_codes():
    w = planted()
    w[5] = 0
    q, s = quantize_rtn(w, 8)
    assert s[5] == 1.0 and torch.all(q[5] == 0)


def test_balance_keeps_the_product_and_equalizes_u_columns():
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(40, 32, generator=gen, dtype=torch.float64) * torch.logspace(1, -2, 32, dtype=torch.float64)
    v = torch.randn(32, 64, generator=gen, dtype=torch.float64)
    u[:, 7] = 0  # a dead rank channel stays as it is
    bu, bv = balance_factors(u, v)
    torch.testing.assert_close(bu @ bv, u @ v, rtol=1e-12, atol=1e-12)
    peaks = bu.abs().amax(dim=0)
    live = torch.ones(32, dtype=torch.bool)
    live[7] = False
    torch.testing.assert_close(peaks[live], peaks[live].mean().expand(31), rtol=1e-12, atol=0)
    assert torch.equal(bv[7], v[7])
    # int4 along the rank (U) and the input (V): balancing lowers the error of the product
    def err(a, b):
        qa = dequantize(*quantize_rtn(a.float(), 4, 16), 4, 16).double()
        qb = dequantize(*quantize_rtn(b.float(), 4, 16), 4, 16).double()
        return float((qa @ qb - u @ v).norm() / (u @ v).norm())
    assert err(bu, bv) < 0.9 * err(u, v)


def test_pack_unpack_int4_round_trip_and_layout():
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(-8, 8, (5, 12), generator=gen, dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 6)
    assert torch.equal(unpack_int4(packed), codes)
    assert int(packed[0, 0]) == (int(codes[0, 0]) + 8) | ((int(codes[0, 1]) + 8) << 4)


def test_smaller_groups_are_more_precise():
    w = planted()
    errs = [float((dequantize(*quantize_rtn(w, 4, g), 4, g) - w).norm()) for g in (64, 16, 8)]
    assert errs[0] > errs[1] > errs[2]


def test_gptq_beats_rtn_on_output_error_with_correlated_inputs():
    gen = torch.Generator().manual_seed(2)
    mix = torch.randn(64, 64, generator=gen)
    x = torch.randn(512, 64, generator=gen) @ mix  # strongly correlated inputs
    gram = x.T @ x
    w = planted()
    for bits, group in ((8, None), (4, 16)):
        rtn = dequantize(*quantize_rtn(w, bits, group), bits, group)
        for act_order in (True, False):
            gq, gs = quantize_gptq(w, gram, bits, group, act_order=act_order)
            assert int(stored_to_codes(gq, bits).min()) >= QMIN[bits]
            gptq = dequantize(gq, gs, bits, group)
            assert output_error(w, gptq, gram) < 0.8 * output_error(w, rtn, gram), (bits, act_order)


def test_gptq_with_identity_gram_is_close_to_rtn():
    w = planted()
    gq, gs = quantize_gptq(w, torch.eye(64) * 10, 8)
    rq, rs = quantize_rtn(w, 8)
    assert torch.equal(gs, rs)  # a constant importance does not change the scale search
    assert (gq.int() - rq.int()).abs().max() <= 1


@pytest.mark.parametrize("bits,group,in_f,msg", [
    (3, None, 64, "bits must be 4 or 8"), (4, 24, 64, "does not divide the input dimension 64"),
    (4, None, 64, "even group size"), (8, 32, 64, "per output channel"),
])
def test_bad_parameters_name_the_module(bits, group, in_f, msg):
    with pytest.raises(FactorlmError, match=msg) as info:
        check_quant_params(bits, group, in_f, "module 'model.layers.0.mlp.up_proj'")
    assert "up_proj" in str(info.value)


def test_stored_bytes():
    assert stored_bytes(8, None, 10, 64) == 640 + 40
    assert stored_bytes(4, 32, 10, 64) == 320 + 4 * 20


def test_gram_weighted_clipping_handles_an_outlier_on_a_quiet_input():
    """A 1000x weight on an input that barely fires (as whitened V factors have): clipping it
    gives the rest of the row (int8) or group (int4) a fine step: the output error drops 2x or more."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(512, 64, generator=gen)
    x[:, 5] *= 1e-3  # a quiet input
    gram = x.T @ x
    w = torch.randn(48, 64, generator=gen)
    w[:, 5] *= 1000.0
    for bits, group in ((8, None), (4, 16)):
        plain = dequantize(*quantize_gptq(w, gram, bits, group, clip=False), bits, group)
        clipped = dequantize(*quantize_gptq(w, gram, bits, group, clip=True), bits, group)
        assert output_error(w, clipped, gram) < 0.5 * output_error(w, plain, gram), bits


def test_refit_u_absorbs_the_error_of_the_quantized_v():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(256, 64, generator=gen, dtype=torch.float64) @ torch.randn(64, 64, generator=gen,
                                                                                dtype=torch.float64)
    gram = x.T @ x
    u = torch.randn(48, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(16, 64, generator=gen, dtype=torch.float64)
    vq = v + 0.05 * torch.randn(16, 64, generator=gen, dtype=torch.float64)
    refit = refit_u(u, v, vq, gram, damp=0.0)
    exact = u @ v
    assert output_error(exact, refit @ vq, gram) < 0.9 * output_error(exact, u @ vq, gram)
    torch.testing.assert_close(refit_u(u, v, v, gram, damp=0.0), u, rtol=1e-8, atol=1e-8)  # nothing to absorb
