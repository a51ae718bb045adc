"""ONNX export of quantized checkpoints: MatMulNBits from the stored codes, logits vs the torch runtime.

Tolerance: with accuracy_level 0 (fp32 compute) ONNX Runtime multiplies exactly the values
the checkpoint stores, so the export's own validation grid (batches 1 and 3, prompts of 1,
17 and 64 tokens, cached decode steps) must hold the fp32 bound: max |dlogit| <= 1e-3 *
max(1, max |logit|).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from factorlm.compressor.quantize import quantize_checkpoint  # noqa: E402
from factorlm.exporters.onnx import export_onnx  # noqa: E402
from factorlm.runtime.format import FactorlmError  # noqa: E402
from factorlm.testing import write_tiny_factored  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


@pytest.fixture(scope="module")
def factored(tmp_path_factory: pytest.TempPathFactory):
    return write_tiny_factored(tmp_path_factory.mktemp("qonnx") / "factored", rank=16)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 16)])
def test_quantized_export_uses_stored_codes_and_matches_runtime(factored, tmp_path, bits, group):
    ckpt = tmp_path / "q"
    quantize_checkpoint(factored, ckpt, bits=bits, group_size=group, dense=False)
    # unfused: one MatMulNBits per stored factor, its initializers named after it
    meta = export_onnx(ckpt, tmp_path / "onnx", threads=1, fuse=False)
    assert meta["validation"]["rel_diff"] <= 1e-3  # also enforced inside export_onnx
    assert meta["validation"]["argmax_mismatches"] == 0
    assert meta["quantization"]["matmuls"] == 28 and meta["quantization"]["bits"] == bits
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 28
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    stored = load_file(ckpt / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight_v"
    q, s = stored[f"{name}_qweight"].numpy(), stored[f"{name}_scales"].numpy()
    b = inits[f"{name}.nbits.B"].reshape(q.shape[0], -1)
    if bits == 4:  # the packed bytes are handed over unchanged
        assert np.array_equal(b, q) and np.array_equal(inits[f"{name}.nbits.scales"], s.reshape(-1))
    else:  # offset by 128, one block per 32 inputs, each block with its row's scale
        assert np.array_equal(b[:, : q.shape[1]].astype(np.int16) - 128, q.astype(np.int16))
        assert np.array_equal(inits[f"{name}.nbits.scales"].reshape(q.shape[0], -1)[:, 0], s)
    # fused (the default): the first factors of q/k/v and of gate/up join, 2 layers x 3 nodes fewer,
    # validated to the same exact bound
    fused = export_onnx(ckpt, tmp_path / "onnx-fused", threads=1)
    assert fused["validation"]["rel_diff"] <= 1e-3 and fused["validation"]["argmax_mismatches"] == 0
    graph = onnx.load(str(tmp_path / "onnx-fused" / "model.onnx")).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 28 - 2 * 3


def test_quantized_export_bad_options(factored, tmp_path):
    ckpt = tmp_path / "q4g8"
    quantize_checkpoint(factored, ckpt, bits=4, group_size=8)
    with pytest.raises(FactorlmError, match="power of two"):
        export_onnx(ckpt, tmp_path / "onnx")
    with pytest.raises(FactorlmError, match="already quantized"):
        export_onnx(ckpt, tmp_path / "onnx", int8=True)
    assert not (tmp_path / "onnx").exists()


def test_cli_accuracy_level_lands_in_every_matmulnbits_node(factored, tmp_path, capsys):
    import json

    from factorlm.cli import main

    ckpt = tmp_path / "q4"
    quantize_checkpoint(factored, ckpt, bits=4, group_size=16)
    out = tmp_path / "onnx-a4"
    assert main(["export", "onnx", str(ckpt), "-o", str(out), "--accuracy-level", "4", "--threads", "1"]) == 0
    nodes = [n for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 28 - 2 * 3  # q/k/v and gate/up first factors joined in both layers
    assert {next(a.i for a in n.attribute if a.name == "accuracy_level") for n in nodes} == {4}
    assert json.loads((out / "factorlm_onnx.json").read_text())["quantization"]["accuracy_level"] == 4
    # levels MatMulNBits does not have, or a graph without MatMulNBits: refused before any work
    with pytest.raises(SystemExit):
        main(["export", "onnx", str(ckpt), "-o", str(tmp_path / "bad"), "--accuracy-level", "5"])
    assert main(["export", "onnx", str(factored), "-o", str(tmp_path / "bad"), "--accuracy-level", "4"]) == 2
    assert "--accuracy-level applies to MatMulNBits" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_gptq_int4_balanced_checkpoint_exports_exactly(factored, tmp_path):
    """Act-order GPTQ, clipped signed scales and balanced factors still export bit-faithfully."""
    ckpt = tmp_path / "q4g"
    quantize_checkpoint(factored, ckpt, bits=4, group_size=16, rounding="gptq", calib_samples=2, calib_len=16)
    meta = export_onnx(ckpt, tmp_path / "onnx", threads=1)
    assert meta["validation"]["rel_diff"] <= 1e-3 and meta["validation"]["argmax_mismatches"] == 0
