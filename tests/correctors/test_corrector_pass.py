"""The corrector block hook, driven by a minimal two-stream block loop over a tiny model."""

import copy

import pytest
import torch

from factorlm.compressor.corrector_pass import CorrectorConfig, CorrectorHook, block_output, loss_curve_png
from factorlm.compressor.correctors import CorrectedLinear
from factorlm.compressor.hooks import BlockContext
from factorlm.runtime.arch import decoder_layers, get_arch
from factorlm.runtime.checkpoint import factorize_model, fold_correctors
from factorlm.runtime.factored_linear import FactoredLinear
from factorlm.runtime.format import FactorlmError
from factorlm.testing import make_tiny_model


def block0_inputs(model, ids):
    """Hidden states and kwargs entering block 0 (captured by a pre-hook, forward stopped early)."""
    captured = {}

    class Stop(Exception):
        pass

    def grab(_m, args, kwargs):
        captured["x"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kw"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise Stop

    h = decoder_layers(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    except Stop:
        pass
    finally:
        h.remove()
    kw = captured["kw"]
    kw.pop("past_key_values", None)
    kw["use_cache"] = False
    return captured["x"], kw


def run_loop(model, hook, ids, rank=8):
    """Factor every block with plain SVD at ``rank``, call the hook, advance both streams."""
    spec = get_arch(model.config)
    layers = decoder_layers(model)
    dense_blocks = [copy.deepcopy(b) for b in layers]
    x, kw = block0_inputs(model, ids)
    student, teacher = [x[i:i + 1] for i in range(x.shape[0])], [x[i:i + 1] for i in range(x.shape[0])]
    shapes = {f"{spec.layers_path}.{i}.{n}": tuple(b.get_submodule(n).weight.shape)
              for i, b in enumerate(layers) for n in spec.block_linear_names()}
    hook.reserved_params(shapes)
    reports = {}
    for i, block in enumerate(layers):
        names = {n: f"{spec.layers_path}.{i}.{n}" for n in spec.block_linear_names()}
        factorize_model(block, {n: rank for n in names})
        ctx = BlockContext(index=i, num_blocks=len(layers), block=block, dense_block=dense_blocks[i],
                           student_inputs=student, teacher_inputs=teacher, block_kwargs=kw,
                           linear_names=names, ranks={n: rank for n in names})
        reports.update(hook(ctx))
        with torch.no_grad():
            student = [block_output(block, s, kw) for s in student]
            teacher = [block_output(dense_blocks[i], t, kw) for t in teacher]
    return reports


def calib(model, n=4, seq=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (n, seq), generator=g)


@pytest.mark.parametrize("arch,init", [("llama", "functional"), ("qwen3", "functional"), ("llama", "weight")])
def test_training_lowers_block_error_and_folding_is_exact(arch, init):
    torch.manual_seed(0)
    model, _ = make_tiny_model(arch)
    ids = calib(model)
    hook = CorrectorHook(CorrectorConfig(rank=8, layer_steps=20, block_steps=60, lr=3e-3, init=init))
    reports = run_loop(model, hook, ids)
    rows = list(reports.values())
    assert all(r["corrector_rank"] == 8 for r in rows)
    for r in rows:
        # closed form never hurts much on its own objective; training on the block output helps
        assert r["block_error_after"] < r["block_error_before"]
        assert r["block_error_after"] <= r["block_error_closed_form"] + 1e-6
    assert any(isinstance(m, CorrectedLinear) for m in model.modules())
    with torch.no_grad():
        before = model(input_ids=ids).logits
    totals = hook.finalize(model, ids)
    assert totals["corrected_modules"] == 14 and not any(isinstance(m, CorrectedLinear) for m in model.modules())
    ranks = {m.rank for m in model.modules() if isinstance(m, FactoredLinear)}
    assert ranks == {16}
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    png = loss_curve_png(hook.history)
    assert png is not None and png[:4] == b"\x89PNG"


def test_functional_closed_form_lowers_the_first_block_error():
    """Closed form only: on block 0 both streams enter alike, so the functional residual is the
    layer's own output error and its rank-8 correction must lower the block error."""
    torch.manual_seed(0)
    model, _ = make_tiny_model("llama")
    hook = CorrectorHook(CorrectorConfig(rank=8, layer_steps=0, block_steps=0))
    reports = run_loop(model, hook, calib(model, n=8, seq=32))
    first = [r for name, r in reports.items() if ".0." in name]
    assert first and all(r["block_error_closed_form"] < r["block_error_before"] for r in first)
    with pytest.raises(FactorlmError, match="corrector init"):
        CorrectorConfig(init="svd")


def test_auto_ranks_stay_within_the_reserved_budget():
    torch.manual_seed(0)
    model, _ = make_tiny_model("llama")
    ids = calib(model)
    hook = CorrectorHook(CorrectorConfig(rank=None, fraction=0.1, layer_steps=0, block_steps=0))
    reports = run_loop(model, hook, ids)
    totals = hook.finalize(model, ids)
    assert 0 < totals["corrector_params"] <= totals["corrector_params_reserved"]
    spent = 0
    for name, row in reports.items():
        o, i = model.get_submodule(name).weight_u.shape[0], model.get_submodule(name).weight_v.shape[1]
        spent += row["corrector_rank"] * (o + i)
    assert spent == totals["corrector_params"]


def test_distillation_lowers_the_kl_and_folds():
    torch.manual_seed(0)
    model, _ = make_tiny_model("llama")
    ids = calib(model, n=3, seq=16)
    hook = CorrectorHook(CorrectorConfig(rank=8, layer_steps=0, block_steps=0, distill_steps=30, distill_lr=3e-3,
                                         train="all"))
    run_loop(model, hook, ids, rank=4)
    totals = hook.finalize(model, ids)
    first, last = totals["distill_loss"]
    assert last < first
    assert fold_correctors(model) == 0


def test_config_errors():
    with pytest.raises(FactorlmError, match="corrector rank"):
        CorrectorConfig(rank=0)
    with pytest.raises(FactorlmError, match="train"):
        CorrectorConfig(train="everything")


def test_compress_cli_with_correctors_end_to_end(tmp_path, capsys):
    """--corrector through the real pipeline: budget kept, ranks grown by the corrector, PNG, loadable."""
    import json

    from factorlm.cli import main
    from factorlm.runtime.checkpoint import load_model
    from factorlm.testing import save_tiny_dense

    src = save_tiny_dense(tmp_path / "dense", "llama")
    calib = tmp_path / "calib.txt"
    calib.write_text(("A factored layer keeps the strongest directions of its inputs. " * 40 + "\n") * 4)
    out = tmp_path / "out"
    assert main(["compress", str(src), "-o", str(out), "--method", "svd-llm", "--keep", "0.7", "--calib", str(calib),
                 "--calib-samples", "4", "--calib-len", "32", "--corrector", "8", "--corrector-steps", "5",
                 "--corrector-layer-steps", "3", "--no-progress"]) == 0
    assert "correctors:" in capsys.readouterr().out
    report = json.loads((out / "factorlm_report.json").read_text())
    totals = report["totals"]
    assert totals["linear_keep"] <= 0.7 + 1e-9
    rows = [r for r in report["layers"] if not r["dense"]]
    assert rows and all(r["corrector_rank"] == 8 and r["saved_rank"] == r["rank"] + 8 for r in rows)
    assert totals["hooks"]["corrector_params"] == sum(8 * sum(r["shape"]) for r in rows)
    assert (out / "factorlm_corrector_loss.png").read_bytes()[:4] == b"\x89PNG"
    model = load_model(out)
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, FactoredLinear)}
    assert ranks == {r["module"]: r["saved_rank"] for r in rows}
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()


def test_bad_corrector_flag_is_a_clear_error(tmp_path, capsys):
    from factorlm.cli import main
    from factorlm.testing import save_tiny_dense

    src = save_tiny_dense(tmp_path / "dense", "llama")
    assert main(["compress", str(src), "-o", str(tmp_path / "o"), "--corrector", "big"]) == 2
    assert "--corrector must be 'auto' or a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_diverging_run_never_leaves_a_block_worse_than_the_plain_factorization():
    """lr 10 wrecks training; the best-state tracking and the fallback keep the block error at most 'before'."""
    torch.manual_seed(0)
    model, _ = make_tiny_model("llama")
    ids = calib(model)
    hook = CorrectorHook(CorrectorConfig(rank=8, layer_steps=5, block_steps=10, lr=10.0))
    rows = list(run_loop(model, hook, ids).values())
    assert all(r["block_error_after"] <= r["block_error_before"] + 1e-6 for r in rows)


def test_corrector_ranks_never_push_a_layer_past_dense():
    """A fixed rank larger than a layer's room is cut so the folded layer stays cheaper than dense."""
    from factorlm.compressor.correctors import corrector_room

    assert corrector_room(192, 576, 136) == 7  # break-even 143 < full rank 192
    assert corrector_room(576, 576, 300) == 0
    torch.manual_seed(0)
    model, _ = make_tiny_model("llama")
    ids = calib(model)
    hook = CorrectorHook(CorrectorConfig(rank=64, layer_steps=0, block_steps=0))
    run_loop(model, hook, ids)
    hook.finalize(model, ids)
    for m in model.modules():
        if isinstance(m, FactoredLinear):
            assert m.rank * (m.in_features + m.out_features) < m.in_features * m.out_features


def test_loss_curve_draws_only_the_stages_that_ran():
    import io

    from PIL import Image

    block = [{"stage": "block", "block": b, "step": i, "loss": 1.0 / (i + 1)} for b in range(2) for i in range(5)]
    distill = [{"stage": "distill", "step": i, "loss": 2.0 - 0.1 * i} for i in range(5)]
    assert loss_curve_png([]) is None
    one = Image.open(io.BytesIO(loss_curve_png(block)))
    two = Image.open(io.BytesIO(loss_curve_png(block + distill)))
    only_distill = Image.open(io.BytesIO(loss_curve_png(distill)))
    assert two.width > 1.8 * one.width and abs(only_distill.width - one.width) <= 2
