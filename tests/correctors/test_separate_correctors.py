"""Checkpoints with correctors kept apart (for further training): save, load, train, fold."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import factorlm  # noqa: F401  (registers the transformers quantizer)
from factorlm.cli import main
from factorlm.compressor.correctors import attach_corrector
from factorlm.runtime.arch import compressible_linears
from factorlm.runtime.checkpoint import factorize_model, fold_correctors, load_factored, save_factored
from factorlm.runtime.factored_linear import CorrectedLinear, FactoredLinear
from factorlm.runtime.format import FactoredConfig, FormatError, read_factored_config
from factorlm.testing import make_tiny_model, save_tiny_dense

IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3]])


def corrected_model(arch="llama"):
    """A tiny model with rank-8 factors everywhere and a random rank-4 corrector on the q/k/v and down projections."""
    model, tok = make_tiny_model(arch)
    factorize_model(model, {n: 8 for n in compressible_linears(model)})
    g = torch.Generator().manual_seed(1)
    for name, module in compressible_linears(model).items():
        if name.endswith(("q_proj", "k_proj", "v_proj", "down_proj")):
            a = torch.randn(4, module.in_features, generator=g) * 0.1
            b = torch.randn(module.out_features, 4, generator=g) * 0.1
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, attach_corrector(module, a, b))
    return model.eval(), tok


def test_separate_save_writes_corrector_tensors_and_ranks(tmp_path):
    model, tok = corrected_model()
    path = save_factored(model, tmp_path / "ck", tokenizer=tok)
    block = read_factored_config(path)
    assert block.correctors == "separate"
    assert len(block.corrector_ranks) == 8 and set(block.corrector_ranks.values()) == {4}
    assert all(r == 8 for r in block.ranks.values())  # the factors' own rank, correctors apart
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
        name = "model.layers.0.self_attn.q_proj"
        q = model.get_submodule(name)
        assert fh.get_tensor(f"{name}.corrector_a").shape == (4, q.in_features)
        assert fh.get_tensor(f"{name}.corrector_b").shape == (q.out_features, 4)
    assert "model.layers.0.self_attn.o_proj.corrector_a" not in keys


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_every_reader_gives_the_in_memory_logits(tmp_path, arch):
    model, tok = corrected_model(arch)
    with torch.no_grad():
        expected = model(IDS).logits
    path = save_factored(model, tmp_path / "ck", tokenizer=tok)

    folded = load_factored(path)  # default: folded on load, plain factors of rank r + c
    assert not any(isinstance(m, CorrectedLinear) for m in folded.modules())
    ranks = {n: m.rank for n, m in folded.named_modules() if isinstance(m, FactoredLinear)}
    assert ranks["model.layers.0.self_attn.q_proj"] == 12 and ranks["model.layers.0.self_attn.o_proj"] == 8
    kept = load_factored(path, correctors="keep")
    assert sum(isinstance(m, CorrectedLinear) for m in kept.modules()) == 8
    hf = AutoModelForCausalLM.from_pretrained(path)
    assert sum(isinstance(m, CorrectedLinear) for m in hf.modules()) == 8
    with torch.no_grad():
        for reader in (folded, kept, hf):
            torch.testing.assert_close(reader(IDS).logits, expected, atol=1e-4, rtol=1e-4)


def test_kept_correctors_train_and_resave(tmp_path):
    model, tok = corrected_model()
    path = save_factored(model, tmp_path / "ck", tokenizer=tok)
    student = load_factored(path, correctors="keep", fast_layout=False)
    student.train()
    params = [p for m in student.modules() if isinstance(m, CorrectedLinear) for p in (m.corrector_a, m.corrector_b)]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1e-2)
    loss = student(IDS, labels=IDS).loss
    loss.backward()
    opt.step()
    assert any(not torch.equal(p, q) for p, q in zip(params, before))
    again = save_factored(student.eval(), tmp_path / "ck2", tokenizer=tok)
    assert read_factored_config(again).correctors == "separate"
    fold_correctors(student)
    with torch.no_grad():
        torch.testing.assert_close(load_factored(again)(IDS).logits, student(IDS).logits, atol=1e-4, rtol=1e-4)


def test_fold_cli_writes_a_plain_checkpoint(tmp_path, capsys):
    model, tok = corrected_model()
    with torch.no_grad():
        expected = model(IDS).logits
    src = save_factored(model, tmp_path / "ck", tokenizer=tok, extra_files={"factorlm_report.json": "{}"})
    out = tmp_path / "folded"
    assert main(["fold", str(src), "-o", str(out)]) == 0
    assert "folded 8 correctors" in capsys.readouterr().out
    block = read_factored_config(out)
    assert block.correctors == "folded" and not block.corrector_ranks
    assert block.ranks["model.layers.1.mlp.down_proj"] == 12
    assert (out / "factorlm_report.json").read_text() == "{}"
    with torch.no_grad():
        torch.testing.assert_close(load_factored(out)(IDS).logits, expected, atol=1e-4, rtol=1e-4)
    assert main(["fold", str(out), "-o", str(tmp_path / "again")]) == 2
    assert "nothing to fold" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_block_validation_names_the_field():
    with pytest.raises(FormatError, match="'corrector_ranks' is missing"):
        FactoredConfig(ranks={"m": 8}, correctors="separate")
    with pytest.raises(FormatError, match="not listed in 'ranks'"):
        FactoredConfig(ranks={"m": 8}, correctors="separate", corrector_ranks={"other": 4})
    with pytest.raises(FormatError, match="is given but 'correctors' is 'folded'"):
        FactoredConfig(ranks={"m": 8}, corrector_ranks={"m": 4})
    block = FactoredConfig(ranks={"m": 8}, correctors="separate", corrector_ranks={"m": 4}).to_dict()
    assert FactoredConfig.from_dict(json.loads(json.dumps(block))).corrector_ranks == {"m": 4}
    assert "corrector_ranks" not in FactoredConfig(ranks={"m": 8}).to_dict()  # folded blocks are unchanged


def test_compress_with_separate_correctors_matches_the_folded_run(tmp_path, capsys):
    src = save_tiny_dense(tmp_path / "dense", "llama")
    calib = tmp_path / "calib.txt"
    calib.write_text(("A factored layer keeps the strongest directions of its inputs. " * 40 + "\n") * 4)
    args = [str(src), "--method", "svd-llm", "--keep", "0.7", "--calib", str(calib), "--calib-samples", "4",
            "--calib-len", "32", "--corrector", "8", "--corrector-steps", "4", "--corrector-layer-steps", "2",
            "--no-progress"]
    assert main(["compress", *args, "-o", str(tmp_path / "folded")]) == 0
    assert main(["compress", *args, "-o", str(tmp_path / "separate"), "--corrector-save", "separate"]) == 0
    assert "kept separate" in capsys.readouterr().out
    sep = json.loads((tmp_path / "separate" / "factorlm_report.json").read_text())["totals"]
    fol = json.loads((tmp_path / "folded" / "factorlm_report.json").read_text())["totals"]
    assert sep["linear_params_after"] == fol["linear_params_after"] and sep["linear_keep"] <= 0.7 + 1e-9
    assert read_factored_config(tmp_path / "separate").correctors == "separate"
    with torch.no_grad():
        torch.testing.assert_close(load_factored(tmp_path / "separate")(IDS).logits,
                                   load_factored(tmp_path / "folded")(IDS).logits, atol=1e-4, rtol=1e-4)


def test_vllm_launcher_refuses_separate_correctors(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from factorlm.exporters.vllm.server import vllm_server_command
    from factorlm.runtime.format import FactorlmError

    model, tok = corrected_model()
    path = save_factored(model, tmp_path / "ck", tokenizer=tok)
    with pytest.raises(FactorlmError, match="factorlm fold"):
        vllm_server_command(str(path))
