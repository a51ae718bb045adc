"""Where each factor of a (possibly fused) linear layer lives under tensor parallelism.

vLLM fuses projections into one layer (``qkv_proj`` = q, k, v; ``gate_up_proj`` = gate,
up) and shards every layer across tensor-parallel ranks. A factored piece W ≈ U·V
(U [out, r], V [r, in]) shards like this:

* column-parallel (qkv_proj, gate_up_proj): the output dim is split, so each rank keeps
  a block of **U rows** and the whole (small) **V**; y_rank = U_rows · (V x).
* row-parallel (o_proj, down_proj): the input dim is split, so each rank keeps a block
  of **V columns** and the whole **U**; each rank computes U·(V_s x_s), and the layer's
  all-reduce sums them: Σ_s U V_s x_s = U (Σ_s V_s x_s) = U V x, because U is linear.

A piece may also be dense (the compressor keeps layers dense at break-even); a dense
piece shards like vLLM's own weight (rows for column-parallel, columns for row-parallel).
GQA with more ranks than kv heads replicates each kv head over ``replicas`` ranks, as
vLLM's QKVParallelLinear does: those ranks load the same shard.

On one rank, the pieces of a layer are stored in three buffers:

* ``weight_v`` [Σ r_i, in_local]: every factored piece's V stacked along the rank dim;
* ``weight_u`` flat [Σ out_local_i · r_i]: each piece's U block, stored transposed
  ([r_i, out_local_i] contiguous, i.e. U column-major, the fast layout for CPU GEMMs);
* ``weight`` [Σ dense out_local_i, in_local]: the dense pieces' rows, as vLLM names it.

This module imports no vLLM, so the arithmetic is unit-tested everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from ...runtime.format import FactorlmError

Parallel = Literal["column", "row"]


@dataclass(frozen=True)
class PartSpec:
    """One piece of a layer as the checkpoint stores it.

    ``out_features`` is the piece's full (unsharded) output size; ``rank`` is None for a
    dense piece; ``replicas`` is how many consecutive ranks share one output shard (kv
    heads under GQA when tp > num_kv_heads, otherwise 1).
    """

    name: str
    out_features: int
    rank: int | None
    replicas: int = 1

    @property
    def factored(self) -> bool:
        return self.rank is not None


@dataclass(frozen=True)
class PartShard:
    """One piece on one rank: which checkpoint rows it takes and where it is stored."""

    spec: PartSpec
    out_local: int  # output rows this rank computes for the piece
    src_row_start: int  # first row of the checkpoint's U (or dense W) taken (column-parallel)
    out_offset: int  # where the piece's output starts in this rank's layer output
    rank_offset: int  # first row of the piece's V in weight_v (factored pieces)
    u_offset: int  # first element of the piece's U block in flat weight_u (factored pieces)
    dense_offset: int  # first row of the piece in the dense weight (dense pieces)

    @property
    def u_numel(self) -> int:
        return self.out_local * (self.spec.rank or 0)


@dataclass(frozen=True)
class LayerPlan:
    """All pieces of one layer on one rank, plus the input columns the rank holds."""

    parallel: Parallel
    tp_rank: int
    tp_size: int
    in_features: int
    in_start: int
    in_local: int
    parts: tuple[PartShard, ...]

    @property
    def total_rank(self) -> int:
        return sum(p.spec.rank or 0 for p in self.parts)

    @property
    def u_numel(self) -> int:
        return sum(p.u_numel for p in self.parts)

    @property
    def dense_rows(self) -> int:
        return sum(p.out_local for p in self.parts if not p.spec.factored)

    @property
    def out_local(self) -> int:
        return sum(p.out_local for p in self.parts)

    @property
    def factored_parts(self) -> tuple[PartShard, ...]:
        return tuple(p for p in self.parts if p.spec.factored)


def kv_head_replicas(num_kv_heads: int, tp_size: int) -> int:
    """Ranks sharing one kv head: tp/num_kv_heads when tp >= num_kv_heads, else 1 (as vLLM)."""
    if tp_size >= num_kv_heads:
        if tp_size % num_kv_heads:
            raise FactorlmError(f"tensor parallel size {tp_size} is not a multiple of {num_kv_heads} kv heads")
        return tp_size // num_kv_heads
    return 1


def _divide(value: int, by: int, what: str) -> int:
    if by <= 0 or value % by:
        raise FactorlmError(f"{what}: {value} is not divisible by {by}")
    return value // by


def make_plan(parts: list[PartSpec], in_features: int, parallel: Parallel, tp_rank: int = 0,
              tp_size: int = 1) -> LayerPlan:
    """The storage plan of a layer made of ``parts`` on rank ``tp_rank`` of ``tp_size``."""
    if not parts:
        raise FactorlmError("a layer needs at least one part")
    if not 0 <= tp_rank < tp_size:
        raise FactorlmError(f"tensor parallel rank {tp_rank} is outside 0..{tp_size - 1}")
    if parallel == "row":
        if len(parts) != 1:
            raise FactorlmError(f"a row-parallel layer has one part, got {[p.name for p in parts]}")
        in_local = _divide(in_features, tp_size, f"{parts[0].name}: input features over tensor parallel ranks")
        in_start = tp_rank * in_local
    elif parallel == "column":
        in_local, in_start = in_features, 0
    else:
        raise FactorlmError(f"unknown parallel style {parallel!r}")
    shards: list[PartShard] = []
    out_offset = rank_offset = u_offset = dense_offset = 0
    for spec in parts:
        if spec.rank is not None and not 1 <= spec.rank <= min(spec.out_features, in_features):
            raise FactorlmError(f"{spec.name}: rank {spec.rank} is outside 1..{min(spec.out_features, in_features)}")
        if parallel == "column":
            groups = _divide(tp_size, spec.replicas, f"{spec.name}: tensor parallel size over kv replicas")
            out_local = _divide(spec.out_features, groups, f"{spec.name}: output features over tensor parallel ranks")
            src_row_start = (tp_rank // spec.replicas) * out_local
        else:
            out_local, src_row_start = spec.out_features, 0
        shard = PartShard(spec, out_local, src_row_start, out_offset, rank_offset, u_offset, dense_offset)
        shards.append(shard)
        out_offset += out_local
        if spec.factored:
            rank_offset += spec.rank  # type: ignore[operator]
            u_offset += shard.u_numel
        else:
            dense_offset += out_local
    return LayerPlan(parallel, tp_rank, tp_size, in_features, in_start, in_local, tuple(shards))


# --------------------------------------------------------------------------- tensor slicing


def _check_shape(tensor: torch.Tensor, expected: tuple[int, int], what: str) -> None:
    if tuple(tensor.shape) != expected:
        raise FactorlmError(f"{what}: checkpoint tensor has shape {tuple(tensor.shape)}, expected {expected}")


def shard_u(u: torch.Tensor, plan: LayerPlan, part: PartShard) -> torch.Tensor:
    """This rank's block of a piece's U [out, r]: a row block (column-parallel) or all of it (row)."""
    _check_shape(u, (part.spec.out_features, part.spec.rank or 0), f"{part.spec.name}.weight_u")
    if plan.parallel == "column":
        return u.narrow(0, part.src_row_start, part.out_local)
    return u


def shard_v(v: torch.Tensor, plan: LayerPlan, part: PartShard) -> torch.Tensor:
    """This rank's block of a piece's V [r, in]: all of it (column-parallel) or a column block (row)."""
    _check_shape(v, (part.spec.rank or 0, plan.in_features), f"{part.spec.name}.weight_v")
    return v.narrow(1, plan.in_start, plan.in_local)


def shard_dense(w: torch.Tensor, plan: LayerPlan, part: PartShard) -> torch.Tensor:
    """This rank's block of a dense piece's W [out, in], sharded as vLLM shards dense weights."""
    _check_shape(w, (part.spec.out_features, plan.in_features), f"{part.spec.name}.weight")
    rows = w.narrow(0, part.src_row_start, part.out_local) if plan.parallel == "column" else w
    return rows.narrow(1, plan.in_start, plan.in_local)


def u_block(flat_u: torch.Tensor, part: PartShard) -> torch.Tensor:
    """The [out_local, r] view of a piece's U inside the flat buffer (stored column-major)."""
    rank = part.spec.rank or 0
    return flat_u.narrow(0, part.u_offset, part.u_numel).view(rank, part.out_local).t()


def v_block(stacked_v: torch.Tensor, part: PartShard) -> torch.Tensor:
    """The [r, in_local] rows of a piece's V inside the stacked weight_v."""
    return stacked_v.narrow(0, part.rank_offset, part.spec.rank or 0)


def dense_block(dense: torch.Tensor, part: PartShard) -> torch.Tensor:
    """The [out_local, in_local] rows of a dense piece inside the stacked dense weight."""
    return dense.narrow(0, part.dense_offset, part.out_local)


def load_piece(plan: LayerPlan, part: PartShard, kind: str, tensor: torch.Tensor, buffer: torch.Tensor) -> None:
    """Copy this rank's share of a checkpoint tensor into its slot of a layer buffer.

    ``kind`` is "weight_u", "weight_v" or "weight" (dense); ``buffer`` the matching layer
    buffer. This is what the vLLM weight loaders call, so the tests exercise it directly.
    """
    if kind == "weight_u":
        if not part.spec.factored:
            raise FactorlmError(f"{part.spec.name}: checkpoint has weight_u but the module is not listed in 'ranks'")
        u_block(buffer, part).copy_(shard_u(tensor, plan, part))
    elif kind == "weight_v":
        if not part.spec.factored:
            raise FactorlmError(f"{part.spec.name}: checkpoint has weight_v but the module is not listed in 'ranks'")
        v_block(buffer, part).copy_(shard_v(tensor, plan, part))
    elif kind == "weight":
        if part.spec.factored:
            raise FactorlmError(
                f"{part.spec.name}: checkpoint has a dense weight but 'ranks' lists the module as factored")
        dense_block(buffer, part).copy_(shard_dense(tensor, plan, part))
    else:
        raise FactorlmError(f"{part.spec.name}: unknown tensor kind {kind!r}")


# --------------------------------------------------------------------------- forward


Gemm = Callable[[torch.Tensor], torch.Tensor]


def linear_gemm(weight: torch.Tensor) -> Gemm:
    """x ↦ x Wᵀ with torch's own GEMM (the default; platforms may swap in packed kernels)."""
    return lambda x: torch.nn.functional.linear(x, weight)


@dataclass(frozen=True)
class BoundPart:
    """A piece ready to run: ``gemm`` maps z_i ↦ z_i U_iᵀ (factored) or x ↦ x W_iᵀ (dense)."""

    factored: bool
    rank_start: int
    rank_end: int
    gemm: Gemm


def bind(plan: LayerPlan, weight_u: torch.Tensor | None, weight_v: torch.Tensor | None,
         weight: torch.Tensor | None, make_gemm: Callable[[torch.Tensor], Gemm] = linear_gemm) -> list[BoundPart]:
    """Views of every piece in output order, each with its GEMM (computed once after loading)."""
    bound: list[BoundPart] = []
    for part in plan.parts:
        if part.spec.factored:
            assert weight_u is not None and weight_v is not None
            u = u_block(weight_u, part)
            bound.append(BoundPart(True, part.rank_offset, part.rank_offset + (part.spec.rank or 0), make_gemm(u)))
        else:
            assert weight is not None
            w = dense_block(weight, part)
            bound.append(BoundPart(False, 0, 0, make_gemm(w)))
    return bound


def local_forward(x: torch.Tensor, v_gemm: Gemm | None, parts: list[BoundPart],
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's layer output: z = x Vᵀ once for all factored pieces (``v_gemm``), then
    y_i = z_i U_iᵀ (or x W_iᵀ for a dense piece), concatenated on the output dim in piece order."""
    z = v_gemm(x) if v_gemm is not None else None
    outs = []
    for part in parts:
        if part.factored:
            assert z is not None
            whole = part.rank_start == 0 and part.rank_end == z.shape[-1]
            zi = z if whole else z[..., part.rank_start:part.rank_end].contiguous()
            outs.append(part.gemm(zi))
        else:
            outs.append(part.gemm(x))
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    return y if bias is None else y + bias
