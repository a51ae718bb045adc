"""Shard/offset plan for fused factored layers under tensor parallelism (no vLLM needed).

Every rank's buffers are filled through ``load_piece`` (what the vLLM weight loaders
call) and run through ``local_forward`` (what the linear method's apply calls); the
ranks' outputs are then put back together the way vLLM does (concatenation for
column-parallel layers, the all-reduce sum for row-parallel ones) and compared with the
dense product of the same factors.
"""

from __future__ import annotations

import pytest
import torch

from factorlm.exporters.vllm.plan import (
    PartSpec,
    bind,
    kv_head_replicas,
    linear_gemm,
    load_piece,
    local_forward,
    make_plan,
    shard_dense,
    shard_u,
    shard_v,
)
from factorlm.runtime.format import FactorlmError

HIDDEN, HEAD, HEADS, KV_HEADS = 64, 32, 4, 2


def _pieces(specs: list[PartSpec], in_features: int, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for s in specs:
        if s.factored:
            out[s.name] = {"weight_u": torch.randn(s.out_features, s.rank, generator=gen, dtype=torch.float64),
                           "weight_v": torch.randn(s.rank, in_features, generator=gen, dtype=torch.float64)}
        else:
            out[s.name] = {"weight": torch.randn(s.out_features, in_features, generator=gen, dtype=torch.float64)}
    return out


def _dense(piece: dict[str, torch.Tensor]) -> torch.Tensor:
    return piece["weight"] if "weight" in piece else piece["weight_u"] @ piece["weight_v"]


def _rank_output(specs, pieces, in_features, parallel, tp_rank, tp_size, x):
    plan = make_plan(specs, in_features, parallel, tp_rank, tp_size)
    u = torch.full((plan.u_numel,), float("nan"), dtype=torch.float64)
    v = torch.full((plan.total_rank, plan.in_local), float("nan"), dtype=torch.float64)
    w = torch.full((plan.dense_rows, plan.in_local), float("nan"), dtype=torch.float64)
    buffers = {"weight_u": u, "weight_v": v, "weight": w}
    for part in plan.parts:
        for kind, tensor in pieces[part.spec.name].items():
            load_piece(plan, part, kind, tensor, buffers[kind])
    assert not any(b.isnan().any() for b in buffers.values()), "every slot must be written"
    x_local = x.narrow(-1, plan.in_start, plan.in_local)
    v_gemm = linear_gemm(v) if plan.total_rank else None
    return plan, local_forward(x_local, v_gemm, bind(plan, u, v, w))


def _qkv_specs(ranks: dict[str, int | None], tp_size: int) -> list[PartSpec]:
    rep = kv_head_replicas(KV_HEADS, tp_size)
    return [PartSpec("q", HEADS * HEAD, ranks["q"]), PartSpec("k", KV_HEADS * HEAD, ranks["k"], rep),
            PartSpec("v", KV_HEADS * HEAD, ranks["v"], rep)]


@pytest.mark.parametrize("tp_size", [1, 2, 4])
@pytest.mark.parametrize("ranks", [dict(q=8, k=4, v=6), dict(q=8, k=None, v=None), dict(q=None, k=5, v=None)])
def test_qkv_column_parallel_reconstructs_dense_slices(tp_size: int, ranks: dict[str, int | None]) -> None:
    specs = _qkv_specs(ranks, tp_size)
    pieces = _pieces(specs, HIDDEN)
    x = torch.randn(3, HIDDEN, dtype=torch.float64)
    per_piece: dict[str, list[torch.Tensor]] = {s.name: [] for s in specs}
    for tp_rank in range(tp_size):
        plan, y = _rank_output(specs, pieces, HIDDEN, "column", tp_rank, tp_size, x)
        for part in plan.parts:
            local = y[:, part.out_offset:part.out_offset + part.out_local]
            dense = _dense(pieces[part.spec.name])
            expected = x @ dense[part.src_row_start:part.src_row_start + part.out_local].T
            torch.testing.assert_close(local, expected, rtol=1e-12, atol=1e-12)
            if tp_rank % part.spec.replicas == 0:  # one copy of each replicated kv shard
                per_piece[part.spec.name].append(local)
    for s in specs:
        torch.testing.assert_close(torch.cat(per_piece[s.name], -1), x @ _dense(pieces[s.name]).T,
                                   rtol=1e-12, atol=1e-12)


def test_gqa_replicas_give_same_kv_shard_to_paired_ranks() -> None:
    specs = _qkv_specs(dict(q=8, k=4, v=None), 4)
    rows = [[p.src_row_start for p in make_plan(specs, HIDDEN, "column", r, 4).parts] for r in range(4)]
    assert [r[0] for r in rows] == [0, 32, 64, 96]  # q: one head per rank
    assert [r[1] for r in rows] == [0, 0, 32, 32]  # k: kv head 0 on ranks 0,1; head 1 on ranks 2,3
    assert [r[2] for r in rows] == [0, 0, 32, 32]


@pytest.mark.parametrize("tp_size", [1, 2, 4])
@pytest.mark.parametrize("ranks", [(10, 14), (10, None), (None, 12)])
def test_gate_up_column_parallel(tp_size: int, ranks: tuple[int | None, int | None]) -> None:
    specs = [PartSpec("gate", 128, ranks[0]), PartSpec("up", 128, ranks[1])]
    pieces = _pieces(specs, HIDDEN, seed=1)
    x = torch.randn(2, HIDDEN, dtype=torch.float64)
    outs = {"gate": [], "up": []}
    for tp_rank in range(tp_size):
        plan, y = _rank_output(specs, pieces, HIDDEN, "column", tp_rank, tp_size, x)
        assert plan.out_local == 256 // tp_size
        for part in plan.parts:
            outs[part.spec.name].append(y[:, part.out_offset:part.out_offset + part.out_local])
    for s in specs:
        torch.testing.assert_close(torch.cat(outs[s.name], -1), x @ _dense(pieces[s.name]).T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tp_size", [1, 2, 4])
@pytest.mark.parametrize("rank", [16, None])
def test_row_parallel_partial_sums_add_up(tp_size: int, rank: int | None) -> None:
    specs = [PartSpec("down", HIDDEN, rank)]
    pieces = _pieces(specs, 128, seed=2)
    x = torch.randn(3, 128, dtype=torch.float64)
    total = torch.zeros(3, HIDDEN, dtype=torch.float64)
    for tp_rank in range(tp_size):
        plan, y = _rank_output(specs, pieces, 128, "row", tp_rank, tp_size, x)
        assert plan.in_local == 128 // tp_size and plan.in_start == tp_rank * plan.in_local
        total += y  # the layer's all-reduce
    torch.testing.assert_close(total, x @ _dense(pieces["down"]).T, rtol=1e-10, atol=1e-10)


def test_row_parallel_shards_v_columns_and_replicates_u() -> None:
    plan = make_plan([PartSpec("o", 64, 8)], 128, "row", 1, 2)
    part = plan.parts[0]
    u, v, w = torch.randn(64, 8), torch.randn(8, 128), torch.randn(64, 128)
    assert torch.equal(shard_u(u, plan, part), u)
    assert torch.equal(shard_v(v, plan, part), v[:, 64:])
    dense_plan = make_plan([PartSpec("o", 64, None)], 128, "row", 1, 2)
    assert torch.equal(shard_dense(w, dense_plan, dense_plan.parts[0]), w[:, 64:])


def test_storage_offsets_of_a_mixed_group() -> None:
    plan = make_plan(_qkv_specs(dict(q=8, k=None, v=6), 2), HIDDEN, "column", 1, 2)
    q, k, v = plan.parts
    assert (q.out_offset, k.out_offset, v.out_offset) == (0, 64, 96)
    assert (q.rank_offset, v.rank_offset, plan.total_rank) == (0, 8, 14)
    assert (q.u_offset, v.u_offset, plan.u_numel) == (0, 64 * 8, 64 * 8 + 32 * 6)
    assert (k.dense_offset, plan.dense_rows) == (0, 32)


def test_errors_name_the_module() -> None:
    plan = make_plan([PartSpec("layers.0.q_proj", 128, 8)], HIDDEN, "column")
    with pytest.raises(FactorlmError, match=r"layers\.0\.q_proj\.weight_u.*\(128, 7\).*\(128, 8\)"):
        load_piece(plan, plan.parts[0], "weight_u", torch.zeros(128, 7), torch.zeros(plan.u_numel))
    with pytest.raises(FactorlmError, match="layers.0.q_proj: checkpoint has a dense weight"):
        load_piece(plan, plan.parts[0], "weight", torch.zeros(128, HIDDEN), torch.zeros(1, HIDDEN))
    with pytest.raises(FactorlmError, match="not divisible"):
        make_plan([PartSpec("down", 64, 8)], 100, "row", 0, 3)
    with pytest.raises(FactorlmError, match="rank 99"):
        make_plan([PartSpec("o", 64, 99)], 64, "column")
