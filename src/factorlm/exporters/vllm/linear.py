"""The vLLM linear method of factored layers: weight_u / weight_v (and dense) buffers, two GEMMs.

``create_weights`` allocates one rank's buffers as ``plan.py`` lays them out and attaches
weight loaders that place each checkpoint tensor (``<piece>.weight_u``, ``.weight_v`` or a
dense ``.weight``; ``loaded_shard_id`` "q"/"k"/"v" or 0/1 for fused layers) into its slot,
taking this rank's tensor-parallel share. ``apply`` computes z = x Vᵀ once for all
factored pieces of the layer, then y_i = z_i U_iᵀ per factored piece and x W_iᵀ per dense
piece, concatenated on the output dim; the layer adds its all-reduce/gather as usual.

A quantized checkpoint (format version 2) is dequantized at load: each piece's stored
``<w>_qweight`` and ``<w>_scales`` are collected by their own loaders and, once both have
arrived, turned into the fp factor (exactly codes * scales) and placed like an fp tensor.
vLLM's weight-only int8/int4 kernels are not used (its CPU build has none for these
per-piece layouts), so in vLLM the savings are on disk only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearMethodBase,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.utils import set_weight_attrs

from ...runtime.format import FactorlmError, FormatError
from .plan import Gemm, LayerPlan, PartShard, PartSpec, bind, linear_gemm, load_piece, local_forward, make_plan

logger = logging.getLogger(__name__)

_QKV_SHARD_IDS = {"q": 0, "k": 1, "v": 2}


def _layer_parallel(layer: torch.nn.Module) -> tuple[str, int, int]:
    """("row"|"column", tp_rank, tp_size) of a vLLM linear layer (replicated: rank 0 of 1)."""
    tp_rank, tp_size = int(getattr(layer, "tp_rank", 0)), int(getattr(layer, "tp_size", 1))
    if isinstance(layer, RowParallelLinear):
        return "row", tp_rank, tp_size
    if isinstance(layer, ColumnParallelLinear):
        return "column", tp_rank, tp_size
    return "column", 0, 1


class FactoredLinearMethod(LinearMethodBase):
    """Linear method of a layer whose pieces are factored (U·V) or dense, each with its own rank.

    ``names`` are the checkpoint (HF) module names of the layer's pieces in output order
    (q, k, v for qkv_proj; gate, up for gate_up_proj; one name otherwise); ``ranks`` the
    matching ranks, None for a dense piece.
    """

    def __init__(self, names: Sequence[str], ranks: Sequence[int | None], scheme: tuple[int, int | None] | None = None,
                 quantized_dense: Sequence[bool] = ()) -> None:
        if len(names) != len(ranks):
            raise FormatError(f"{list(names)}: {len(ranks)} ranks for {len(names)} pieces")
        self.names = list(names)
        self.ranks = list(ranks)
        self.scheme = scheme  # (bits, group size) of a quantized checkpoint, else None
        self.quantized_dense = list(quantized_dense) or [False] * len(names)

    # ------------------------------------------------------------------ weights

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        extra_weight_attrs.pop("weight_loader", None)  # vLLM's loaders cannot stack per-piece ranks
        parallel, tp_rank, tp_size = _layer_parallel(layer)
        if len(output_partition_sizes) != len(self.names):
            raise FormatError(
                f"{layer.prefix}: vLLM builds {len(output_partition_sizes)} output pieces but the checkpoint "
                f"names {len(self.names)} ({self.names})"
            )
        replicas = int(getattr(layer, "num_kv_head_replicas", 1)) if isinstance(layer, QKVParallelLinear) else 1
        specs = []
        for index, (name, rank, local) in enumerate(zip(self.names, self.ranks, output_partition_sizes)):
            part_replicas = replicas if index > 0 else 1  # q is never replicated; k, v may be
            groups = tp_size // part_replicas if parallel == "column" else 1
            specs.append(PartSpec(name, local * groups, rank, part_replicas))
        plan = make_plan(specs, input_size, parallel, tp_rank, tp_size)
        local_sizes = [p.out_local for p in plan.parts]
        if plan.in_local != input_size_per_partition or local_sizes != list(output_partition_sizes):
            raise FormatError(f"{layer.prefix}: factor plan disagrees with vLLM's partition sizes")
        layer.factorlm_plan = plan
        layer.factorlm_shard_ids = self._shard_ids(layer)

        def add(name: str, shape: tuple[int, ...]) -> None:
            param = Parameter(torch.empty(shape, dtype=params_dtype), requires_grad=False)
            layer.register_parameter(name, param)
            set_weight_attrs(param, {"weight_loader": self._loader(layer, name)})
            set_weight_attrs(param, extra_weight_attrs)

        if plan.factored_parts:
            add("weight_v", (plan.total_rank, plan.in_local))
            add("weight_u", (plan.u_numel,))
        if plan.dense_rows:
            add("weight", (plan.dense_rows, plan.in_local))
        if self.scheme is not None:
            self._add_quantized_loaders(layer, params_dtype, extra_weight_attrs)
        if not plan.dense_rows:
            # vLLM's LoRA wrapper finds the layer's device through `weight`, `qweight`, ...;
            # a plain tensor attribute (not a Parameter, so the loader does not expect it).
            layer.qweight = layer.weight_v.data

    def _add_quantized_loaders(self, layer: torch.nn.Module, params_dtype: torch.dtype,
                               extra_weight_attrs: dict[str, Any]) -> None:
        """Placeholders named like the stored tensors; their loaders dequantize a piece once codes and scales are in."""
        kinds = set()
        if any(r is not None for r in self.ranks):
            kinds |= {"weight_u", "weight_v"}
        if any(self.quantized_dense):
            kinds.add("weight")
        layer.factorlm_pending = {}
        for kind in sorted(kinds):
            for suffix in ("_qweight", "_scales"):
                param = Parameter(torch.empty(0, dtype=params_dtype), requires_grad=False)
                layer.register_parameter(kind + suffix, param)
                set_weight_attrs(param, {"weight_loader": self._quant_loader(layer, kind, suffix, params_dtype)})
                set_weight_attrs(param, extra_weight_attrs)

    def _quant_loader(self, layer: torch.nn.Module, kind: str, suffix: str, dtype: torch.dtype):
        from ...runtime.quant import dequantize

        place = self._loader(layer, kind)
        bits, group = self.scheme or (8, None)

        def weight_loader(param: Parameter, loaded_weight: torch.Tensor, loaded_shard_id: Any = None) -> None:
            pending = layer.factorlm_pending.setdefault((kind, loaded_shard_id), {})
            pending[suffix] = loaded_weight
            if len(pending) == 2:
                del layer.factorlm_pending[(kind, loaded_shard_id)]
                weight = dequantize(pending["_qweight"].cpu(), pending["_scales"].cpu(), bits, group, dtype)
                place(getattr(layer, kind), weight, loaded_shard_id)

        return weight_loader

    def _shard_ids(self, layer: torch.nn.Module) -> dict[Any, int]:
        if len(self.names) == 1:
            return {None: 0}
        if isinstance(layer, QKVParallelLinear):
            return dict(_QKV_SHARD_IDS)
        return {index: index for index in range(len(self.names))}

    def _loader(self, layer: torch.nn.Module, kind: str):
        plan: LayerPlan = layer.factorlm_plan
        shard_ids: dict[Any, int] = layer.factorlm_shard_ids

        def weight_loader(param: Parameter, loaded_weight: torch.Tensor, loaded_shard_id: Any = None) -> None:
            if len(plan.parts) == 1 and loaded_shard_id in (None, 0):
                index = 0
            elif loaded_shard_id in shard_ids and loaded_shard_id is not None:
                index = shard_ids[loaded_shard_id]
            else:
                raise FormatError(
                    f"{layer.prefix}.{kind}: cannot place a tensor with shard id {loaded_shard_id!r}; factored "
                    f"checkpoints store each piece ({', '.join(self.names)}) separately, not fused on disk"
                )
            part: PartShard = plan.parts[index]
            load_piece(plan, part, kind, loaded_weight.to(param.dtype), param.data)

        return weight_loader

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Bind each piece's GEMM once (plain attributes, so the loader never expects them).

        On vLLM's CPU platform every GEMM (the stacked V, each U block, each dense piece)
        gets the kernel vLLM picks for its own dense layers (oneDNN with prepacked weights,
        or another platform kernel), and the unpacked buffers are released as vLLM does for
        dense layers, so factored and dense models are compared on the same kernels.
        ``FACTORLM_VLLM_CPU_GEMM=torch`` uses torch's GEMM on the unpacked factors instead
        (U column-major), which has less per-call overhead at batch 1 on small layers.
        """
        pending = getattr(layer, "factorlm_pending", None)
        if pending:
            raise FormatError(f"{layer.prefix}: quantized tensors without their pair (codes or scales missing): "
                              f"{sorted((k, s, sorted(v)) for (k, s), v in pending.items())}")
        for name in [n for n, _ in layer.named_parameters(recurse=False) if n.endswith(("_qweight", "_scales"))]:
            delattr(layer, name)  # the placeholders; the dequantized factors are in weight_u/weight_v/weight
        make_gemm = _cpu_gemm if _on_cpu() and cpu_gemm_choice() == "vllm" else linear_gemm
        weight_v = getattr(layer, "weight_v", None)
        layer.factorlm_v_gemm = make_gemm(weight_v.data) if weight_v is not None else None
        layer.factorlm_bound = bind(layer.factorlm_plan, _data(layer, "weight_u"), _data(layer, "weight_v"),
                                    _data(layer, "weight"), make_gemm)
        if make_gemm is _cpu_gemm:
            for name in ("weight_u", "weight_v", "weight"):
                param = getattr(layer, name, None)
                if param is not None:
                    param.data = torch.empty(0, dtype=param.dtype, device=param.device)
            if hasattr(layer, "qweight"):
                layer.qweight = layer.weight_v.data

    # ------------------------------------------------------------------ forward

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return local_forward(x, layer.factorlm_v_gemm, layer.factorlm_bound, bias)


def _data(layer: torch.nn.Module, name: str) -> torch.Tensor | None:
    param = getattr(layer, name, None)
    return None if param is None else param.data


CPU_GEMM_ENV = "FACTORLM_VLLM_CPU_GEMM"
CPU_GEMM_CHOICES = ("vllm", "torch")


def cpu_gemm_choice() -> str:
    """Which GEMM factored layers use on vLLM's CPU platform: "vllm" (default) or "torch"."""
    choice = os.environ.get(CPU_GEMM_ENV, "vllm").strip().lower()
    if choice not in CPU_GEMM_CHOICES:
        raise FactorlmError(f"{CPU_GEMM_ENV}={choice!r}; expected one of {', '.join(CPU_GEMM_CHOICES)}")
    return choice


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _cpu_gemm(weight: torch.Tensor) -> Gemm:
    """x ↦ x Wᵀ through the kernel vLLM's CPU platform chooses for a dense weight of this shape."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    holder = SimpleNamespace(weight=weight.contiguous(), bias=None)
    try:
        dispatch_cpu_unquantized_gemm(holder, remove_weight=True)
    except (RuntimeError, AttributeError, TypeError) as exc:  # an unusual platform build: plain torch GEMM
        logger.warning("vLLM CPU GEMM dispatch failed (%s); using torch.nn.functional.linear", exc)
        return linear_gemm(weight.contiguous())
    kernel, packed = holder.cpu_linear, holder.weight
    return lambda x: kernel(x, packed, None)
