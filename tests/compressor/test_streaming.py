"""Block-wise two-stream streaming: exactness of the streams, the error they carry, block hooks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from factorlm.compressor.hooks import BlockContext
from factorlm.compressor.pipeline import CompressionRecipe, compress_checkpoint, compress_model
from factorlm.compressor.streaming import capture_block_inputs, run_block, split_batches
from factorlm.runtime.arch import compressible_linears, decoder_layers
from factorlm.runtime.factored_linear import FactoredLinear
from factorlm.testing import make_tiny_model, save_tiny_dense


def _ids(n: int = 4, length: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 380, (n, length), generator=g)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_streaming_reproduces_the_full_forward(arch):
    """Captured block-0 inputs and per-block kwargs, run block by block, give the model's own hidden states."""
    model, _ = make_tiny_model(arch)
    ids = _ids()
    captured = capture_block_inputs(model, split_batches(ids, 2))
    seen = {}
    handle = model.model.norm.register_forward_pre_hook(lambda _m, a: seen.__setitem__("h", a[0]))
    with torch.no_grad():
        model(input_ids=ids)
        handle.remove()
        states = captured.hidden
        for index, block in enumerate(decoder_layers(model)):
            states = [run_block(block, x, captured.block_kwargs[index]) for x in states]
    torch.testing.assert_close(torch.cat(states), seen["h"], rtol=1e-5, atol=1e-5)


def test_split_batches_equal_sizes():
    assert [b.shape[0] for b in split_batches(_ids(6), 4)] == [3, 3]
    assert [b.shape[0] for b in split_batches(_ids(5), 4)] == [1] * 5


class ZeroOut(nn.Module):
    """Stands in for a hook-modified linear: outputs zeros of the right width."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


class RecordingHook:
    """A trivial hook: reserves parameters, records the streams, modifies block 0, reports a field."""

    def __init__(self, reserve: int = 0):
        self.reserve = reserve
        self.calls: list[int] = []
        self.streams_equal: dict[int, bool] = {}
        self.expected: dict[str, torch.Tensor] = {}
        self.checked = False

    def reserved_params(self, shapes: dict[str, tuple[int, int]]) -> int:
        return self.reserve

    def __call__(self, ctx: BlockContext) -> dict[str, dict]:
        self.calls.append(ctx.index)
        self.streams_equal[ctx.index] = all(torch.equal(s, t) for s, t in zip(ctx.student_inputs, ctx.teacher_inputs))
        assert set(ctx.grams) == set(ctx.linear_names)
        assert isinstance(ctx.dense_block.get_submodule("mlp.down_proj"), nn.Linear)
        if ctx.index == 0:
            before = copy.deepcopy(ctx.block)
            down = ctx.block.get_submodule("mlp.down_proj")
            ctx.block.mlp.down_proj = ZeroOut(down.out_features)
            with torch.no_grad():
                self.expected["modified"] = run_block(ctx.block, ctx.student_inputs[0], ctx.block_kwargs)
                self.expected["unmodified"] = run_block(before, ctx.student_inputs[0], ctx.block_kwargs)
        elif ctx.index == 1:
            x = ctx.student_inputs[0]
            self.checked = torch.allclose(x, self.expected["modified"]) and not torch.allclose(
                x, self.expected["unmodified"])
        return {name: {"hook_seen": ctx.index} for name in ctx.linear_names.values()}

    def finalize(self, model: nn.Module, calib_ids: torch.Tensor) -> dict:
        block = decoder_layers(model)[0]
        down = block.mlp.down_proj
        block.mlp.down_proj = FactoredLinear.from_factors(torch.zeros(down.out_features, 8),
                                                          torch.zeros(8, model.config.intermediate_size))
        return {"finalized": True, "calib_rows": int(calib_ids.shape[0])}


def _calib(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("Calibration text about gardens, rivers and old stone bridges in the hills. " * 40)
    return str(p)


def test_block_hook_sees_two_streams_and_the_student_advances_through_its_changes(tmp_path):
    src = save_tiny_dense(tmp_path / "d")
    hook = RecordingHook(reserve=2000)
    recipe = CompressionRecipe(method="saes", keep=0.7, calib=_calib(tmp_path), calib_samples=4, calib_len=32)
    out, report = compress_checkpoint(src, tmp_path / "o", recipe, progress=False, hooks=[hook])
    assert hook.calls == [0, 1]
    assert hook.streams_equal == {0: True, 1: False}  # the student carries block 0's error
    assert hook.checked
    assert all(row["hook_seen"] in (0, 1) for row in report["layers"])
    assert report["totals"]["hooks"] == {"finalized": True, "calib_rows": 4}
    assert report["totals"]["budget"]["reserved_params"] == 2000
    budget = report["totals"]["budget"]["linear_budget"]
    assert report["totals"]["linear_params_after"] <= budget - 2000 + 8 * (64 + 128)
    assert (out / "factorlm_report.json").is_file()


def test_saes_with_beta_zero_equals_svdllm(tmp_path):
    torch.manual_seed(0)
    ids = _ids(4, 32)
    results = {}
    for method, beta in (("saes", 0.0), ("svd-llm", None)):
        model, _ = make_tiny_model()
        compress_model(model, CompressionRecipe(method=method, keep=0.6, beta=beta), ids, progress=False)
        results[method] = {n: m.weight_u @ m.weight_v for n, m in compressible_linears(model).items()
                           if isinstance(m, FactoredLinear)}
    assert results["saes"].keys() == results["svd-llm"].keys()
    for name in results["saes"]:
        torch.testing.assert_close(results["saes"][name], results["svd-llm"][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("aces", ["energy", "holdout"])
def test_saes_uses_the_accumulated_error(tmp_path, aces):
    """beta is 0 where there is no error yet (block 0's q/k/v; all of block 0 with one-pass
    statistics); the paper's energy ACES picks beta > 0 later; the held-out criterion never
    picks a beta that is worse than 0 on the held-out half."""
    ids = _ids(4, 32)
    model, _ = make_tiny_model()
    one_pass = compress_model(copy.deepcopy(model), CompressionRecipe(method="saes", keep=0.5, aces=aces,
                                                                      sequential=False), ids, progress=False)
    assert all(r["beta"] == 0.0 for r in one_pass["layers"] if r["module"].startswith("model.layers.0."))
    report = compress_model(model, CompressionRecipe(method="saes", keep=0.5, aces=aces), ids, progress=False)
    rows = [row for row in report["layers"] if not row["dense"]]
    assert all(r["beta"] == 0.0 for r in rows if r["module"].startswith("model.layers.0.self_attn.")
               and r["module"].endswith(("q_proj", "k_proj", "v_proj")))
    if aces == "energy":
        assert any(r["beta"] > 0 for r in rows)
    else:
        assert all(r["holdout_gain"] <= 0 for r in rows)


def test_sequential_statistics_see_the_blocks_earlier_factorizations():
    """Sequential: block 0's o_proj is the svd-llm factorization for the inputs it gets once q/k/v
    are factorized; the one-pass statistics (dense block) give another o_proj but the same q/k/v."""
    from factorlm.compressor.methods import InputStats, MethodOptions, get_method

    ids = _ids(4, 32)
    dense, _ = make_tiny_model()
    seq, one = copy.deepcopy(dense), copy.deepcopy(dense)
    compress_model(seq, CompressionRecipe(method="svd-llm", keep=0.5), ids, progress=False)
    compress_model(one, CompressionRecipe(method="svd-llm", keep=0.5, sequential=False), ids, progress=False)
    b_seq, b_one, b_dense = (decoder_layers(m)[0].self_attn for m in (seq, one, dense))
    torch.testing.assert_close(b_seq.q_proj.weight_u, b_one.q_proj.weight_u)
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(b_dense, name, getattr(b_seq, name))
    seen = []
    handle = b_dense.o_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for batch in split_batches(ids, 4):
            dense(input_ids=batch)
    handle.remove()
    x = torch.cat(seen).double()
    u, v, _ = get_method("svd-llm").factorize(b_dense.o_proj.weight.detach(), InputStats(gram=x.T @ x, count=len(x)),
                                              b_seq.o_proj.rank, MethodOptions())
    torch.testing.assert_close(b_seq.o_proj.weight_u @ b_seq.o_proj.weight_v, (u @ v).float(), rtol=1e-3, atol=1e-4)
    assert not torch.allclose(b_one.o_proj.weight_u @ b_one.o_proj.weight_v, (u @ v).float(), rtol=1e-3, atol=1e-4)


def test_sequential_saes_runs_the_teacher_block_once_per_block():
    """The dense block's inputs are recorded once per block and reused by every input group: a block
    runs once on the teacher stream, once per group on the student stream (cut short after the
    group's input) and once to advance the student (plus the capture of the block inputs)."""
    ids = _ids(4, 32)
    model, _ = make_tiny_model()
    calls: list[int] = []
    for index, block in enumerate(decoder_layers(model)):
        block.register_forward_pre_hook(lambda _m, _a, index=index: calls.append(index))
    compress_model(model, CompressionRecipe(method="saes", keep=0.5, batch_size=2), ids, progress=False)
    batches = len(split_batches(ids, 2))
    groups = 4  # q/k/v, o, gate/up, down
    for index in range(len(decoder_layers(model))):
        assert calls.count(index) == (1 + 1 + groups + 1) * batches


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (16, 16)])
def test_holdout_errors_match_the_direct_truncation(shape):
    """The eigen-solve shortcut gives, for every β, the anchored error of the SVD-truncated CEALC map."""
    from factorlm.compressor.methods import anchored_error, holdout_errors, _truncated_map
    from factorlm.compressor.whitening import whiten

    g = torch.Generator().manual_seed(1)
    m, n = shape
    rank = min(m, n) // 2
    w = torch.randn(m, n, generator=g, dtype=torch.float64)

    def stats() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(200, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
        xf = x + 0.3 * torch.randn(200, n, generator=g, dtype=torch.float64)
        return x.T @ x, (xf - x).T @ x

    (fit_gram, fit_cross), (held_gram, held_cross) = stats(), stats()
    white = whiten(fit_gram)
    fast = holdout_errors(w, white, fit_cross, held_gram, held_cross, rank, dtype=torch.float64)
    for beta in (0.0, 0.3, 0.9):
        target = w @ white.sqrt + beta * (w @ fit_cross) @ white.inv_sqrt.T
        direct = anchored_error(_truncated_map(target, white.inv_sqrt, rank), w, held_gram, held_cross)
        assert fast(beta) == pytest.approx(direct, rel=1e-6)


def test_holdout_aces_finds_a_systematic_input_error():
    """Planted: the student input is a fixed distortion of the teacher's; with plenty of tokens the
    held-out criterion picks a large beta and beats beta = 0 on fresh data."""
    from factorlm.compressor.methods import InputStats, aces_holdout, anchored_error

    g = torch.Generator().manual_seed(0)
    n, m, rank = 16, 12, 6
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    distort = torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=g, dtype=torch.float64)

    def stats(tokens: int) -> tuple[InputStats, torch.Tensor, torch.Tensor]:
        xf = torch.randn(tokens, n, generator=g, dtype=torch.float64)
        x = xf @ distort.T
        return InputStats(gram=x.T @ x, cross=(xf - x).T @ x, count=tokens), x, xf

    fit, held = stats(4000)[0], stats(4000)[0]
    beta, gain = aces_holdout(w, fit, held, rank, (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), 1e-6)
    assert beta >= 0.5 and gain < 0
    # anchored_error equals the direct sum up to the constant teacher energy
    st, x, xf = stats(300)
    approx = torch.randn(m, n, generator=g, dtype=torch.float64)
    direct = float(((x @ approx.T - xf @ w.T) ** 2).sum() - ((xf @ w.T) ** 2).sum())
    assert anchored_error(approx, w, st.gram, st.cross) == pytest.approx(direct, rel=1e-4)


@pytest.mark.gpu
def test_streaming_on_cuda_matches_cpu():
    """--device cuda: blocks run on the GPU, activations wait on the CPU; same ranks, close factors."""
    ids = _ids(4, 32)
    results = {}
    for device in ("cpu", "cuda"):
        model, _ = make_tiny_model()
        report = compress_model(model, CompressionRecipe(method="saes", keep=0.6, beta=0.3, device=device), ids,
                                progress=False)
        results[device] = (report, {n: (m.weight_u @ m.weight_v).cpu() for n, m in compressible_linears(model).items()
                                    if isinstance(m, FactoredLinear)})
    assert [r["rank"] for r in results["cpu"][0]["layers"]] == [r["rank"] for r in results["cuda"][0]["layers"]]
    for name, w in results["cpu"][1].items():
        torch.testing.assert_close(results["cuda"][1][name], w, rtol=1e-3, atol=1e-3)
