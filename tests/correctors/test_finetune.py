"""End-to-end distillation of a factored checkpoint (factorlm finetune)."""

import json

import pytest
import torch

from factorlm.cli import main
from factorlm.compressor.correctors import attach_corrector, lr_factor
from factorlm.compressor.finetune import FinetuneConfig, finetune_checkpoint, split_windows
from factorlm.runtime.arch import compressible_linears
from factorlm.runtime.checkpoint import factorize_model, load_factored, save_factored
from factorlm.runtime.factored_linear import CorrectedLinear, FactoredLinear
from factorlm.runtime.format import FactorlmError, read_factored_config
from factorlm.testing import make_tiny_model, save_tiny_dense

TEXT = ("Low rank compression keeps the directions that carry the most energy of the activations. "
        "Serving engines batch requests so that the weights are read once for many sequences. ") * 60


@pytest.fixture()
def pair(tmp_path):
    """(dense folder, rank-6 factored copy of it, training text file)."""
    dense = save_tiny_dense(tmp_path / "dense", "llama")
    model, tok = make_tiny_model("llama")
    factorize_model(model, {n: 6 for n in compressible_linears(model)})
    factored = save_factored(model, tmp_path / "factored", tokenizer=tok)
    text = tmp_path / "train.txt"
    text.write_text(TEXT)
    return dense, factored, text


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    values = [lr_factor(s, 50, 5) for s in range(50)]
    assert values[:5] == sorted(values[:5]) and values[4] == 1.0
    assert values[5:] == sorted(values[5:], reverse=True)
    assert values[-1] == pytest.approx(0.1)


def test_held_out_windows_come_from_the_last_tenth():
    ids = torch.arange(1000)
    train, held = split_windows(ids, FinetuneConfig(samples=20, held_out=5, seq_len=16), "t")
    assert int(train.max()) < 900 and int(held.min()) >= 900


def test_finetune_lowers_the_held_out_kl_and_keeps_ranks_and_frozen_weights(pair, tmp_path):
    dense, factored, text = pair
    cfg = FinetuneConfig(steps=40, lr=3e-3, samples=8, seq_len=32, held_out=2)
    out, report = finetune_checkpoint(factored, dense, tmp_path / "out", str(text), cfg, progress=False)
    assert report["held_out_kl_after"] < report["held_out_kl_before"]
    assert len(report["loss"]) == 40
    assert read_factored_config(out).ranks == read_factored_config(factored).ranks
    before, after = load_factored(factored), load_factored(out)
    sb, sa = before.state_dict(), after.state_dict()
    assert list(sa) == list(sb)
    changed = {k for k in sb if not torch.equal(sa[k], sb[k])}
    assert changed and all(k.endswith(("weight_u", "weight_v")) for k in changed)  # norms, embeddings fixed
    saved = json.loads((out / "factorlm_finetune.json").read_text())
    assert saved["held_out_kl_after"] == report["held_out_kl_after"]
    assert (out / "factorlm_finetune_loss.png").read_bytes()[:4] == b"\x89PNG"


def test_correctors_only_leaves_the_factors_alone(tmp_path):
    dense = save_tiny_dense(tmp_path / "dense", "llama")
    model, tok = make_tiny_model("llama")
    factorize_model(model, {n: 6 for n in compressible_linears(model)})
    for name, module in compressible_linears(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                attach_corrector(module, torch.randn(2, module.in_features) * 0.01, torch.zeros(module.out_features, 2)))
    src = save_factored(model, tmp_path / "sep", tokenizer=tok)
    text = tmp_path / "train.txt"
    text.write_text(TEXT)
    cfg = FinetuneConfig(steps=10, lr=3e-3, samples=4, seq_len=32, held_out=1, train="correctors")
    out, _ = finetune_checkpoint(src, dense, tmp_path / "out", str(text), cfg, progress=False)
    assert read_factored_config(out).correctors == "separate"
    before = load_factored(src, correctors="keep").state_dict()
    after = load_factored(out, correctors="keep").state_dict()
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    assert changed and all(k.endswith(("corrector_a", "corrector_b")) for k in changed)
    assert all(isinstance(m, CorrectedLinear) for m in load_factored(out, correctors="keep").modules()
               if isinstance(m, FactoredLinear))


def test_errors_name_the_problem(pair, tmp_path, capsys):
    dense, factored, text = pair
    cfg = FinetuneConfig(steps=1, samples=1, seq_len=16, held_out=1, train="correctors")
    with pytest.raises(FactorlmError, match="no separate correctors"):
        finetune_checkpoint(factored, dense, tmp_path / "o1", str(text), cfg, progress=False)
    assert not (tmp_path / "o1").exists()
    other = save_tiny_dense(tmp_path / "other", "llama", vocab_size=400)
    with pytest.raises(FactorlmError, match="vocabulary size"):
        finetune_checkpoint(factored, other, tmp_path / "o2", str(text), FinetuneConfig(steps=1), progress=False)
    with pytest.raises(FactorlmError, match="learning rate"):
        FinetuneConfig(lr=0)
    assert main(["finetune", str(factored), "--teacher", str(dense), "-o", str(factored), "--steps", "1"]) == 2
    assert "exists" in capsys.readouterr().err


def test_cli_runs_end_to_end(pair, tmp_path, capsys):
    dense, factored, text = pair
    assert main(["finetune", str(factored), "--teacher", str(dense), "-o", str(tmp_path / "out"), "--calib", str(text),
                 "--steps", "3", "--samples", "2", "--seq-len", "24", "--held-out", "1", "--no-progress"]) == 0
    assert "held-out KL to the teacher" in capsys.readouterr().out
    assert load_factored(tmp_path / "out")(torch.tensor([[3, 4, 5]])).logits.isfinite().all()


def test_default_draws_one_distinct_training_window_per_step():
    ids = torch.arange(5000)
    cfg = FinetuneConfig(steps=30, seq_len=16, held_out=2)
    assert cfg.windows_needed(1) == 30
    assert FinetuneConfig(steps=30, batch_size=2, grad_accum=3).windows_needed(2) == 30 * 12
    train, _ = split_windows(ids, cfg, "t")
    assert train.shape == (30, 16) and len({int(r[0]) for r in train}) == 30
    assert FinetuneConfig(steps=30, samples=8).windows_needed(4) == 8
