"""Shared-input MatMul fusion on hand-built graphs: same outputs, fewer nodes, only what may be fused."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from factorlm.exporters.onnx.fuse import MS_DOMAIN, fuse_shared_input_matmuls  # noqa: E402

K = 64


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _model(nodes, inits, inputs, outputs, ms: bool = False) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 20)] + ([helper.make_opsetid(MS_DOMAIN, 1)] if ms else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def _vi(name: str, width: int | str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["b", width])


def test_matmuls_on_one_input_become_one_matmul_and_a_split() -> None:
    rng = np.random.default_rng(0)
    widths = {"q": 8, "k": 4, "v": 4, "other": 8}
    inits = [numpy_helper.from_array(rng.standard_normal((K, n)).astype(np.float32), f"w_{k}")
             for k, n in widths.items()]
    inits.append(numpy_helper.from_array(rng.standard_normal((K, 8)).astype(np.float32), "w_shared"))
    nodes = [helper.make_node("MatMul", ["x", f"w_{k}"], [k]) for k in ("q", "k", "v")]
    nodes.append(helper.make_node("MatMul", ["y", "w_other"], ["other"]))  # another input: alone
    # a weight read by two nodes is not concatenated away from its other reader
    nodes += [helper.make_node("MatMul", ["x", "w_shared"], ["s1"]), helper.make_node("MatMul", ["y", "w_shared"], ["s2"])]
    nodes.append(helper.make_node("Relu", ["q"], ["q_relu"]))  # a consumer after the first member
    outs = [_vi("q_relu", 8), _vi("k", 4), _vi("v", 4), _vi("other", 8), _vi("s1", 8), _vi("s2", 8)]
    model = _model(nodes, inits, [_vi("x", K), _vi("y", K)], outs)
    feeds = {"x": rng.standard_normal((3, K)).astype(np.float32), "y": rng.standard_normal((3, K)).astype(np.float32)}
    want = _run(model, feeds)

    stats = fuse_shared_input_matmuls(model)
    onnx.checker.check_model(model)
    assert (stats.groups, stats.nodes, stats.removed) == (1, 3, 2)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMul") == 4 and ops.count("Split") == 1
    assert {i.name for i in model.graph.initializer} >= {"w_other", "w_shared"}
    assert not {"w_q", "w_k", "w_v"} & {i.name for i in model.graph.initializer}
    for got, ref in zip(_run(model, feeds), want):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert fuse_shared_input_matmuls(model).groups == 0  # nothing left to join


def _nbits_node(name: str, n: int, block: int, rng: np.random.Generator) -> tuple[onnx.NodeProto, list]:
    blocks = K // block
    b = rng.integers(0, 256, (n, blocks, block), dtype=np.uint8)
    s = (rng.random(n * blocks) * 0.01 + 1e-3).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", f"{name}.B", f"{name}.scales"], [name], domain=MS_DOMAIN, K=K, N=n,
                            bits=8, block_size=block, accuracy_level=0)
    return node, [numpy_helper.from_array(b, f"{name}.B"), numpy_helper.from_array(s, f"{name}.scales")]


def test_matmulnbits_with_one_input_and_layout_are_joined_exactly() -> None:
    rng = np.random.default_rng(1)
    parts = [_nbits_node("gate", 24, 32, rng), _nbits_node("up", 24, 32, rng), _nbits_node("odd", 8, 16, rng)]
    nodes = [p[0] for p in parts]
    inits = [t for p in parts for t in p[1]]
    model = _model(nodes, inits, [_vi("x", K)], [_vi("gate", 24), _vi("up", 24), _vi("odd", 8)], ms=True)
    feeds = {"x": rng.standard_normal((2, K)).astype(np.float32)}
    want = _run(model, feeds)

    stats = fuse_shared_input_matmuls(model)
    assert (stats.groups, stats.nodes) == (1, 2)  # a different block size stays on its own
    fused = [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.name.startswith("fused")]
    assert len(fused) == 1 and next(a.i for a in fused[0].attribute if a.name == "N") == 48
    for got, ref in zip(_run(model, feeds), want):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
