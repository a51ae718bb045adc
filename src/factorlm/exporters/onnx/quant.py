"""ONNX export of quantized checkpoints from the *stored* codes and scales.

The graph is traced from the dequantized model (exactly codes * scales, so the trace and
validation see the checkpoint's values), then every MatMul whose constant weight is one of
the quantized weights is rewritten to ONNX Runtime's ``com.microsoft.MatMulNBits`` fed with
the checkpoint's own integers and scales; nothing is re-quantized.

- int8 (per output channel): 8-bit MatMulNBits blocks of ``INT8_BLOCK`` along the input
  dimension, each block of a row given that row's one scale (the same numbers, in the
  layout the kernel reads); codes are stored offset by 128 (its default zero point) and a
  ragged last block is padded with the zero code.
- int4 (group-wise): 4-bit MatMulNBits with ``block_size`` = the group size; the packed
  bytes (offset 8, even column in the low nibble) are ORT's layout already and are handed
  over unchanged. The kernel needs a power-of-two group size >= 16.

Quantized embeddings (format version 3) become ``Gather`` on the int8 rows, ``Cast`` to
float and ``Mul`` by the gathered per-row scales: the graph stores and reads what the
checkpoint holds, and computes exactly ``codes * scale`` per looked-up row.

The weight a MatMul uses is found by value: the exporter folds ``W^T`` into a fresh
initializer, so each stored weight is matched by a digest of its dequantized ``W^T``.
``accuracy_level`` 0 computes in fp32 (logits match the torch runtime to fp32 rounding);
4 lets ORT quantize activations to int8 per block, faster, as the dense ``--int8`` export does.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...runtime.format import FactorlmError

log = logging.getLogger(__name__)
INT8_BLOCK = 32
MS_DOMAIN = "com.microsoft"


@dataclass
class StoredWeight:
    """One quantized weight as the checkpoint holds it."""

    name: str
    qweight: torch.Tensor  # int8 [out, in] or packed uint8 [out, in / 2]
    scales: torch.Tensor  # fp32 [out] or [out, in / G]
    bits: int
    group_size: int | None
    in_features: int


def _digest(weight_t: np.ndarray) -> str:
    arr = np.ascontiguousarray(weight_t, dtype=np.float32)
    return hashlib.sha1(arr.tobytes() + str(arr.shape).encode()).hexdigest()


def stored_weights(model: nn.Module) -> dict[str, StoredWeight]:
    """{digest of W^T: stored weight} for every quantized weight of ``model`` (before dequantizing it)."""
    from ...runtime.quant_linear import quantized_modules

    found: dict[str, StoredWeight] = {}
    for fqn, layer in quantized_modules(model).items():
        for part in layer.parts:
            w = layer.dequantized(part, torch.float32)
            found[_digest(w.t().numpy())] = StoredWeight(
                f"{fqn}.{part}", getattr(layer, f"{part}_qweight").detach().cpu(),
                getattr(layer, f"{part}_scales").detach().float().cpu(), layer.bits, layer.group_size, w.shape[1])
    return found


@dataclass
class StoredEmbedding:
    """One int8 embedding table as the checkpoint holds it."""

    name: str
    qweight: torch.Tensor  # int8 [vocab, hidden]
    scales: torch.Tensor  # fp32 [vocab]


def stored_embeddings(model: nn.Module) -> dict[str, StoredEmbedding]:
    """{digest of the dequantized table: stored table} for every quantized embedding of ``model``."""
    from ...runtime.quant_embedding import quantized_embeddings

    return {_digest(layer.dequantized(torch.float32).numpy()): StoredEmbedding(
                fqn, layer.weight_qweight.detach().cpu(), layer.weight_scales.detach().float().cpu())
            for fqn, layer in quantized_embeddings(model).items()}


def _set_nodes(graph: Any, nodes: list[Any]) -> None:
    """Replace the graph's nodes by ``nodes`` and drop the initializers no node reads any more."""
    del graph.node[:]
    graph.node.extend(nodes)
    used = {x for n in graph.node for x in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def insert_stored(path: Path, weights: dict[str, StoredWeight], embeddings: dict[str, StoredEmbedding],
                  external_data: bool, accuracy_level: int = 0) -> tuple[int, int]:
    """Both rewrites below on the graph at ``path``, loaded and saved once; returns (MatMuls, embeddings) rewritten."""
    import onnx

    from .metadata import save_onnx

    model = onnx.load(str(path))
    n_quant = insert_stored_codes(model, weights, accuracy_level) if weights else 0
    n_emb = insert_stored_embeddings(model, embeddings) if embeddings else 0
    save_onnx(model, path, external_data)
    return n_quant, n_emb


def insert_stored_embeddings(model: Any, stored: dict[str, StoredEmbedding]) -> int:
    """Rewrite each Gather on a quantized embedding's table to Gather(int8) -> Cast -> Mul(gathered scales)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new_nodes, done = [], set()
    for node in graph.node:
        table = node.input[0] if node.op_type == "Gather" and len(node.input) == 2 else None
        arr = numpy_helper.to_array(inits[table]) if table in inits else None
        s = stored.get(_digest(arr)) if arr is not None and arr.ndim == 2 else None
        if s is None or any(a.name == "axis" and a.i != 0 for a in node.attribute):
            new_nodes.append(node)
            continue
        stem = f"{s.name}.int8"
        if s.name not in done:
            graph.initializer.extend([numpy_helper.from_array(s.qweight.numpy(), f"{stem}.codes"),
                                      numpy_helper.from_array(s.scales.numpy().reshape(-1, 1), f"{stem}.scales")])
        ids, out = node.input[1], node.output[0]
        new_nodes += [
            helper.make_node("Gather", [f"{stem}.codes", ids], [f"{out}.codes"], name=f"{node.name}_codes", axis=0),
            helper.make_node("Gather", [f"{stem}.scales", ids], [f"{out}.scales"], name=f"{node.name}_scales", axis=0),
            helper.make_node("Cast", [f"{out}.codes"], [f"{out}.float"], name=f"{node.name}_cast",
                             to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{out}.float", f"{out}.scales"], [out], name=f"{node.name}_dequant"),
        ]
        done.add(s.name)
    missing = {s.name for s in stored.values()} - done
    if missing:
        raise FactorlmError(f"ONNX export: no Gather found for quantized embeddings {sorted(missing)}")
    _set_nodes(graph, new_nodes)
    log.info("wrote %d embedding lookups on int8 rows from the stored codes", len(done))
    return len(done)


def check_exportable(stored: dict[str, StoredWeight]) -> None:
    """MatMulNBits needs int4 groups that are a power of two >= 16; say which module before tracing."""
    for s in stored.values():
        g = s.group_size or 0
        if s.bits == 4 and (g < 16 or g & (g - 1)):
            raise FactorlmError(f"module {s.name!r}: int4 group size {g} cannot be exported to ONNX Runtime's "
                                f"MatMulNBits (needs a power of two >= 16)")


def nbits_inputs(s: StoredWeight) -> tuple[np.ndarray, np.ndarray, int]:
    """(B [N, blocks, blob] uint8, scales [N * blocks] fp32, block size) for MatMulNBits from stored codes."""
    out_f, in_f = s.qweight.shape[0], s.in_features
    if s.bits == 4:
        g = int(s.group_size or 0)
        b = s.qweight.numpy().reshape(out_f, in_f // g, g // 2)
        return b, s.scales.numpy().reshape(-1).astype(np.float32), g
    blocks = -(-in_f // INT8_BLOCK)
    codes = np.full((out_f, blocks * INT8_BLOCK), 128, dtype=np.uint8)
    codes[:, :in_f] = (s.qweight.numpy().astype(np.int16) + 128).astype(np.uint8)
    scales = np.repeat(s.scales.numpy().astype(np.float32)[:, None], blocks, axis=1).reshape(-1)
    return codes.reshape(out_f, blocks, INT8_BLOCK), scales, INT8_BLOCK


def insert_stored_codes(model: Any, stored: dict[str, StoredWeight], accuracy_level: int = 0) -> int:
    """Rewrite the MatMuls on quantized weights to MatMulNBits from the stored codes; returns how many."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    replaced: dict[str, str] = {}  # initializer -> module part
    new_nodes = []
    for node in graph.node:
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight not in inits:
            new_nodes.append(node)
            continue
        arr = numpy_helper.to_array(inits[weight])
        s = stored.get(_digest(arr)) if arr.ndim == 2 else None
        if s is None:
            new_nodes.append(node)
            continue
        b, scales, block = nbits_inputs(s)
        stem = f"{s.name}.nbits"
        if stem not in {i.name for i in graph.initializer}:
            graph.initializer.extend([numpy_helper.from_array(b, f"{stem}.B"),
                                      numpy_helper.from_array(scales, f"{stem}.scales")])
        new_nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], f"{stem}.B", f"{stem}.scales"], list(node.output), name=f"{node.name}_nbits",
            domain=MS_DOMAIN, K=s.in_features, N=int(arr.shape[1]), bits=s.bits, block_size=block,
            accuracy_level=accuracy_level))
        replaced[weight] = s.name
    _set_nodes(graph, new_nodes)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    missing = {s.name for s in stored.values()} - set(replaced.values())
    if missing:
        raise FactorlmError(f"ONNX export: no MatMul found for quantized weights {sorted(missing)[:5]}")
    log.info("wrote %d quantized MatMuls as MatMulNBits from the stored codes", len(replaced))
    return len(replaced)


def quant_metadata(block: Any, count: int, accuracy_level: int, embeddings: int = 0) -> dict[str, Any]:
    return {"bits": block.bits, "group_size": block.group_size, "rounding": block.rounding, "matmuls": count,
            "int8_embeddings": embeddings,
            "op": "com.microsoft.MatMulNBits", "accuracy_level": accuracy_level, "source": "stored codes and scales"}
