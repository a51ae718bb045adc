"""Graph fusions applied after tracing: RMSNorms into one op, shared-input MatMuls into one.

**Norms.** The traced RMSNorm is seven nodes (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul,
Mul) and the residual Add before it an eighth; ONNX Runtime's session optimizer leaves them
alone. ONNX Runtime's transformer optimizer, with every fusion off but the two layer-norm
ones, rewrites them into ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization``
(one kernel each); about 430 nodes fewer on a 30-layer model.

**Shared-input MatMuls.**

Every projection of a decoder block that reads the same tensor (q, k and v after the
attention norm; gate and up after the MLP norm) can be one wider MatMul: the weights are
concatenated along the output dimension and the result is split back. For a factored block
this joins the first factors (``x @ V_q^T``, ``x @ V_k^T``, ``x @ V_v^T``), which is where a
factored layer pays twice the per-node cost of a dense one; a dense block gets the classic
QKV / gate-up fusion, so dense baselines gain as well and comparisons stay fair.

Both kinds of node are handled, after the weights have their final form:

- ``MatMul`` on a constant 2-D initializer ``[K, N]``: concatenated along N;
- ``com.microsoft.MatMulNBits`` (``B`` ``[N, blocks, blob]``, ``scales`` ``[N * blocks]``,
  no zero points, no ``g_idx``, no bias): B and scales concatenated along N when K, bits,
  block size and accuracy level agree. Each output row keeps its own blocks and scales, so
  the fused node computes exactly what the separate ones did.

Grouping is by (input, kind, attributes); nodes whose weight is shared with another consumer
are left alone. The Split sits where the first member sat, so topological order holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
MS_DOMAIN = "com.microsoft"
# the skip fusion needs shape inference to see that residual and normed input have one shape
_KEEP_FUSIONS = ("enable_layer_norm", "enable_skip_layer_norm", "enable_shape_inference")


@dataclass(frozen=True)
class FuseStats:
    """How many groups were fused and how many nodes they replaced."""

    groups: int
    nodes: int

    @property
    def removed(self) -> int:
        """MatMul nodes fewer than before (each group becomes one MatMul + one Split)."""
        return self.nodes - self.groups


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _key(node: Any, inits: dict[str, Any], uses: dict[str, int]) -> tuple | None:
    """The fusion key of a node, or None if it cannot join a group."""
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and len(node.input) == 2:
        w = inits.get(node.input[1])
        if w is None or len(w.dims) != 2 or uses[node.input[1]] != 1:
            return None
        return ("MatMul", node.input[0], int(w.dims[0]), int(w.data_type))
    if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN and len(node.input) == 3:
        b, s = node.input[1], node.input[2]
        if b not in inits or s not in inits or uses[b] != 1 or uses[s] != 1:
            return None
        a = _attrs(node)
        return ("MatMulNBits", node.input[0], a["K"], a["bits"], a["block_size"], a.get("accuracy_level", 0),
                int(inits[b].data_type), int(inits[s].data_type))
    return None


def _out_width(node: Any, inits: dict[str, Any]) -> int:
    if node.op_type == "MatMul":
        return int(inits[node.input[1]].dims[1])
    return int(_attrs(node)["N"])


def _fused_node(group: list[Any], inits: dict[str, Any], stem: str) -> tuple[Any, list[Any]]:
    """One MatMul/MatMulNBits over the concatenated weights and its new initializers."""
    from onnx import helper, numpy_helper

    first = group[0]
    arrays = lambda i: [numpy_helper.to_array(inits[n.input[i]]) for n in group]  # noqa: E731
    if first.op_type == "MatMul":
        w = numpy_helper.from_array(np.concatenate(arrays(1), axis=1), f"{stem}.weight")
        return helper.make_node("MatMul", [first.input[0], w.name], [f"{stem}.out"], name=stem), [w]
    a = _attrs(first)
    b = numpy_helper.from_array(np.concatenate(arrays(1), axis=0), f"{stem}.B")
    s = numpy_helper.from_array(np.concatenate(arrays(2), axis=0), f"{stem}.scales")
    n_total = sum(_out_width(n, inits) for n in group)
    node = helper.make_node("MatMulNBits", [first.input[0], b.name, s.name], [f"{stem}.out"], name=stem,
                            domain=MS_DOMAIN, K=a["K"], N=n_total, bits=a["bits"], block_size=a["block_size"],
                            accuracy_level=a.get("accuracy_level", 0))
    return node, [b, s]


def fuse_norms(model: Any, num_heads: int, hidden_size: int) -> tuple[Any, int]:
    """(model with RMSNorms fused, how many norm ops it has now); only the layer-norm fusions run."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("gpt2")
    for flag in vars(options):
        if flag.startswith("enable_") and flag not in _KEEP_FUSIONS:
            setattr(options, flag, False)
    logging.getLogger("onnxruntime.transformers").setLevel(logging.WARNING)
    optimized = optimize_model(model, model_type="gpt2", num_heads=num_heads, hidden_size=hidden_size,
                               optimization_options=options, opt_level=0)
    fused = optimized.model
    count = sum(n.op_type.endswith("SimplifiedLayerNormalization") for n in fused.graph.node)
    log.info("fused RMSNorms: %d norm ops", count)
    return fused, count


def fuse_shared_input_matmuls(model: Any) -> FuseStats:
    """Rewrite ``model`` (an ``onnx.ModelProto``) in place; returns what was fused."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    groups: dict[tuple, list[Any]] = {}
    for node in graph.node:
        key = _key(node, inits, uses)
        if key is not None:
            groups.setdefault(key, []).append(node)
    fusable = [g for g in groups.values() if len(g) > 1]
    if not fusable:
        return FuseStats(0, 0)
    replace: dict[int, list[Any]] = {}  # id(first node) -> new nodes
    drop: set[int] = set()
    dead: set[str] = set()
    new_inits = []
    for i, group in enumerate(fusable):
        stem = f"fused_matmul_{i}"
        fused, weights = _fused_node(group, inits, stem)
        widths = [_out_width(n, inits) for n in group]
        split_sizes = numpy_helper.from_array(np.array(widths, dtype=np.int64), f"{stem}.split")
        split = helper.make_node("Split", [fused.output[0], split_sizes.name], [n.output[0] for n in group],
                                 name=f"{stem}_split", axis=-1)
        replace[id(group[0])] = [fused, split]
        drop.update(id(n) for n in group[1:])
        dead.update(x for n in group for x in n.input[1:])
        new_inits += [*weights, split_sizes]
    nodes = []
    for node in graph.node:
        if id(node) in replace:
            nodes += replace[id(node)]
        elif id(node) not in drop:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    keep = [i for i in graph.initializer if i.name not in dead]
    del graph.initializer[:]
    graph.initializer.extend(keep + new_inits)
    stats = FuseStats(len(fusable), sum(len(g) for g in fusable))
    log.info("fused %d MatMuls that share an input into %d", stats.nodes, stats.groups)
    return stats


def fuse_file(path: Path, external_data: bool, config: Any, *, norms: bool = False,
              matmuls: bool = False) -> dict[str, int]:
    """Apply the chosen fusions to the graph at ``path`` in place; returns what each did."""
    import onnx

    from .metadata import save_onnx

    model = onnx.load(str(path))
    done: dict[str, int] = {}
    if norms:
        model, done["norm_ops"] = fuse_norms(model, config.num_attention_heads, config.hidden_size)
    if matmuls:
        stats = fuse_shared_input_matmuls(model)
        done["matmul_groups"], done["matmuls_fused"] = stats.groups, stats.nodes
    save_onnx(model, path, external_data)
    return done
