"""Quantization math on planted matrices: round trips, error bounds, packing, GPTQ vs RTN."""

from __future__ import annotations

import pytest
import torch

from factorlm.runtime.format import FactorlmError
from factorlm.runtime.quant import (check_quant_params, dequantize, output_error, pack_int4, quantize_gptq,
                                    quantize_rtn, stored_bytes, unpack_int4)


def planted(out_f: int = 48, in_f: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    w[3] *= 50.0  # an outlier row: per-channel scales must keep the other rows precise
    return w


def test_int8_round_trip_error_is_within_half_a_step_per_channel():
    w = planted()
    q, s = quantize_rtn(w, 8)
    assert q.dtype == torch.int8 and q.shape == w.shape and s.shape == (w.shape[0],)
    back = dequantize(q, s, 8)
    step = w.abs().amax(dim=1) / 127
    assert torch.all((back - w).abs() <= step[:, None] / 2 + 1e-6)
    assert torch.allclose(s, step)
    assert int(q.abs().max()) == 127


def test_int8_exact_on_representable_weights():
    scales = torch.tensor([0.5, 0.25, 2.0])
    codes = torch.tensor([[127, -3, 0, 5], [-127, 1, 2, 3], [10, 127, -4, 0]], dtype=torch.int8)
    w = codes.float() * scales[:, None]
    q, s = quantize_rtn(w, 8)
    assert torch.equal(q, codes) and torch.equal(s, scales)
    assert torch.equal(dequantize(q, s, 8), w)


def test_zero_rows_get_unit_scale_and_zero_codes():
    w = planted()
    w[5] = 0
    q, s = quantize_rtn(w, 8)
    assert s[5] == 1.0 and torch.all(q[5] == 0)


def test_pack_unpack_int4_round_trip_and_layout():
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(-8, 8, (5, 12), generator=gen, dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 6)
    assert torch.equal(unpack_int4(packed), codes)
    assert int(packed[0, 0]) == (int(codes[0, 0]) + 8) | ((int(codes[0, 1]) + 8) << 4)


@pytest.mark.parametrize("group", [8, 16, 64])
def test_int4_group_round_trip_error_is_within_half_a_step_per_group(group):
    w = planted()
    q, s = quantize_rtn(w, 4, group)
    assert q.shape == (48, 32) and s.shape == (48, 64 // group)
    back = dequantize(q, s, 4, group)
    step = w.reshape(48, -1, group).abs().amax(dim=2) / 7
    assert torch.all((back - w).abs() <= step.repeat_interleave(group, dim=1) / 2 + 1e-6)


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
        gq, gs = quantize_gptq(w, gram, bits, group)
        gptq = dequantize(gq, gs, bits, group)
        assert output_error(w, gptq, gram) < 0.8 * output_error(w, rtn, gram), bits


def test_gptq_with_identity_gram_is_close_to_rtn():
    w = planted()
    gq, gs = quantize_gptq(w, torch.eye(64) * 10, 8)
    rq, rs = quantize_rtn(w, 8)
    assert torch.equal(gs, rs)
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
