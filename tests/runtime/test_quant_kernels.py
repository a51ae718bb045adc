"""Every registered quantized-layer kernel computes the stored weights: exact ones to fp32
rounding (1e-4), the bf16-activation ones within ``BF16_TOLERANCE`` of the output's largest
magnitude; requirements a layer does not meet are refused, naming the kernel and the part."""

from __future__ import annotations

import pytest
import torch

from factorlm.runtime.factored_linear import FactoredLinear
from factorlm.runtime.format import FactorlmError
from factorlm.runtime.quant_kernels import BF16_TOLERANCE, KERNELS
from factorlm.runtime.quant_linear import QuantizedFactoredLinear, QuantizedLinear


def layer(bits: int, group: int | None, out_f: int = 48, in_f: int = 64, rank: int = 32) -> QuantizedFactoredLinear:
    torch.manual_seed(0)
    fp = FactoredLinear.from_linear(torch.nn.Linear(in_f, out_f, bias=True), rank)
    return QuantizedFactoredLinear.from_factored(fp, bits, group)


@torch.no_grad()
def reference(q: QuantizedFactoredLinear, x: torch.Tensor) -> torch.Tensor:
    return (x @ q.dequantized("weight_v").T) @ q.dequantized("weight_u").T + q.bias


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_every_supporting_kernel_matches_the_dequantized_matmul(bits, group):
    q = layer(bits, group)
    ran = []
    for batch in (1, 8):
        x = torch.randn(batch, 3, 64)
        expected = reference(q, x)
        for name, kernel in KERNELS.items():
            if kernel.unsupported(q.part_info("weight_u")) or kernel.unsupported(q.part_info("weight_v")):
                continue
            q.prepare(name)
            with torch.no_grad():
                got = q(x)
            assert got.dtype == x.dtype and got.shape == expected.shape
            if kernel.exact:
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            else:
                rel = float((got - expected).abs().max() / expected.abs().max())
                assert rel <= BF16_TOLERANCE, (name, rel)
            ran.append(name)
    expected_kernels = {"cached", "dequant", "int8pack", "int8-bf16"} if bits == 8 else {"cached", "dequant",
                                                                                            "int4-bf16"}
    assert set(ran) == expected_kernels


def test_dense_quantized_linear_through_the_bf16_kernel():
    torch.manual_seed(1)
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 32, bias=False), 8)
    x = torch.randn(2, 64)
    expected = x @ q.dequantized("weight").T
    q.prepare("int8-bf16")
    with torch.no_grad():
        rel = float((q(x) - expected).abs().max() / expected.abs().max())
    assert rel <= BF16_TOLERANCE


def test_fastest_picks_per_layer_what_it_supports():
    for bits, group, want in ((8, None, "int8-bf16"), (4, 32, "int4-bf16"), (4, 16, "cached")):
        q = layer(bits, group)
        q.prepare("fastest")
        assert {k.name for k in q._kernels.values()} == {want}, (bits, group)


@pytest.mark.parametrize("bits,group,kernel,msg", [
    (4, 32, "int8-bf16", "needs 8-bit weights"),
    (4, 32, "int8pack", "needs 8-bit weights"),
    (8, None, "int4-bf16", "needs 4-bit weights"),
    (4, 16, "int4-bf16", "group size 16 is not one of"),
])
def test_unsupported_requests_name_kernel_and_part(bits, group, kernel, msg):
    q = layer(bits, group)
    q.prepare("cached")
    with pytest.raises(FactorlmError, match=msg) as info:
        q.prepare(kernel)
    assert kernel in str(info.value) and "weight_" in str(info.value)
    assert {k.name for k in q._kernels.values()} == {"cached"}  # a refused request changes nothing


def test_int4_kernel_needs_output_multiple_of_16():
    q = layer(4, 32, out_f=40, rank=32)  # U is [40, 32]
    with pytest.raises(FactorlmError, match="output dimension 40 is not a multiple of 16"):
        q.prepare("int4-bf16")


def test_mixed_kernels_cast_between_parts():
    """V on the bf16 kernel, U on the exact one ("fastest" on a U the int4 kernel refuses):
    the bf16 intermediate is cast to U's fp32 compute dtype, and the result is fp32."""
    q = layer(4, 32, out_f=40, rank=32)  # U [40, 32] refused by int4-bf16, V [32, 64] accepted
    q.prepare("fastest")
    assert (q._kernels["weight_v"].name, q._kernels["weight_u"].name) == ("int4-bf16", "cached")
    x = torch.randn(2, 5, 64)
    expected = reference(q, x)
    with torch.no_grad():
        got = q(x)
    assert got.dtype == torch.float32
    assert float((got - expected).abs().max() / expected.abs().max()) <= BF16_TOLERANCE


def test_cli_quant_kernel_flag(tmp_path, capsys):
    from factorlm.cli import main
    from factorlm.compressor.quantize import quantize_checkpoint
    from factorlm.testing import write_tiny_factored

    src = write_tiny_factored(tmp_path / "f", rank=16)
    quantize_checkpoint(src, tmp_path / "q", bits=8)
    args = ["generate", str(tmp_path / "q"), "--prompt", "Once upon", "--max-new-tokens", "4"]
    assert main([*args, "--quant-kernel", "fastest"]) == 0
    assert main([*args, "--quant-kernel", "int9"]) == 2
    err = capsys.readouterr().err
    assert "--quant-kernel 'int9'" in err and "fastest" in err
