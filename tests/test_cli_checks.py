"""Every CLI mistake is one line ``factorlm: error: ...`` with exit code 2, found before any long work.

"Before any long work" is checked by making the long work (compression, fine-tuning,
export, model loading) fail the test if it is reached.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from factorlm.cli import main
from factorlm.testing import save_tiny_dense, write_tiny_factored


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return save_tiny_dense(tmp_path_factory.mktemp("m") / "dense")


@pytest.fixture(scope="module")
def factored(tmp_path_factory):
    return write_tiny_factored(tmp_path_factory.mktemp("f") / "fac", rank=8)


@pytest.fixture
def no_long_work(monkeypatch):
    """Reaching a model load or a long job fails the test."""

    def boom(*args, **kwargs):
        raise AssertionError("long work started before the arguments were checked")

    for target in ("factorlm.compressor.pipeline.compress_checkpoint", "factorlm.compressor.finetune.finetune_checkpoint",
                   "factorlm.runtime.checkpoint.load_model", "factorlm.runtime.checkpoint.load_factored"):
        monkeypatch.setattr(target, boom)


def one_line_error(capsys, argv, fragment):
    """Run the CLI; it must exit 2 with exactly one stderr line that contains ``fragment``."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors exit from inside parse_args
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("factorlm: error: "), err
    assert fragment in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- numeric flags


BAD_FLAGS = [
    (["compress", "D", "-o", "O", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got '0'"),
    (["compress", "D", "-o", "O", "--batch-size", "two"], "argument --batch-size: must be an integer, got 'two'"),
    (["compress", "D", "-o", "O", "--beta", "5"], "argument --beta: must be in [0, 1]"),
    (["compress", "D", "-o", "O", "--beta", "-0.1"], "argument --beta: must be in [0, 1]"),
    (["compress", "D", "-o", "O", "--beta", "nan"], "argument --beta: must be in [0, 1]"),
    (["compress", "D", "-o", "O", "--calib-samples", "0"], "argument --calib-samples: must be an integer >= 1"),
    (["compress", "D", "-o", "O", "--calib-len", "1"], "argument --calib-len: must be an integer >= 2"),
    (["compress", "D", "-o", "O", "--keep", "0"], "argument --keep: must be in (0, 1]"),
    (["compress", "D", "-o", "O", "--reduction", "1"], "argument --reduction: must be in (0, 1)"),
    (["compress", "D", "-o", "O", "--reduction", "-0.2"], "argument --reduction: must be in (0, 1)"),
    (["compress", "D", "-o", "O", "--rank-multiple", "0"], "argument --rank-multiple: must be an integer >= 1"),
    (["compress", "D", "-o", "O", "--min-rank", "-8"], "argument --min-rank: must be an integer >= 1"),
    (["compress", "D", "-o", "O", "--corrector-fraction", "1.5"], "argument --corrector-fraction: must be in (0, 1)"),
    (["compress", "D", "-o", "O", "--corrector-steps", "-1"], "argument --corrector-steps: must be an integer >= 0"),
    (["compress", "D", "-o", "O", "--corrector-lr", "0"], "argument --corrector-lr: must be in (0, inf)"),
    (["compress", "D", "-o", "O", "--method", "pca"], "argument --method: invalid choice: 'pca'"),
    (["finetune", "F", "--teacher", "D", "-o", "O", "--steps", "0"], "argument --steps: must be an integer >= 1"),
    (["finetune", "F", "--teacher", "D", "-o", "O", "--lr", "-1"], "argument --lr: must be in (0, inf)"),
    (["finetune", "F", "--teacher", "D", "-o", "O", "--seq-len", "1"], "argument --seq-len: must be an integer >= 2"),
    (["finetune", "F", "--teacher", "D", "-o", "O", "--held-out", "0"], "argument --held-out: must be an integer >= 1"),
    (["generate", "D", "--prompt", "x", "--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1"),
    (["generate", "D", "--prompt", "x", "--top-p", "0"], "argument --top-p: must be in (0, 1]"),
    (["generate", "D", "--prompt", "x", "--temperature", "-1"], "argument --temperature: must be in [0, inf)"),
    (["generate", "D", "--prompt", "x", "--threads", "0"], "argument --threads: must be an integer >= 1"),
    (["eval", "ppl", "D", "--text", "t", "--window", "1"], "argument --window: must be an integer >= 2"),
    (["eval", "zeroshot", "D", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (["eval", "zeroshot", "D", "--limit", "0"], "argument --limit: must be an integer >= 1"),
    (["export", "onnx", "D", "-o", "O", "--threads", "0"], "argument --threads: must be an integer >= 1"),
    (["bench", "serving", "--url", "u", "--model", "m", "--concurrency", "1", "0"],
     "argument --concurrency: must be an integer >= 1"),
    (["bench", "serving", "--url", "u", "--model", "m", "--request-rate", "0"], "argument --request-rate: must be in (0"),
    (["bench", "offline", "D", "F", "--repeats", "0"], "argument --repeats: must be an integer >= 1"),
    (["compress", "D", "-o", "O", "--device", "bogus"], "argument --device: unknown device 'bogus'; choose cpu, cuda[:N]"),
    (["compress", "D", "-o", "O", "--device", "cpu:1"], "argument --device: unknown device 'cpu:1'"),
    (["bench", "offline", "D", "F", "--device", "bogus"], "argument --device: unknown device 'bogus'; choose cpu, cuda"),
    (["bench", "offline", "D", "F", "--device", "cuda:0"], "argument --device: unknown device 'cuda:0'"),
]


@pytest.mark.parametrize(("argv", "fragment"), BAD_FLAGS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_FLAGS])
def test_impossible_flag_values_are_one_line_errors(argv, fragment, capsys, tmp_path, no_long_work):
    line = one_line_error(capsys, [str(tmp_path / a) if a in ("D", "F", "O") else a for a in argv], fragment)
    assert line.endswith(f"(see 'factorlm {argv[0]}{' ' + argv[1] if argv[0] in ('eval', 'export', 'bench') else ''}"
                         " --help')")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("argv", [["compress", "D", "-o", "O"], ["bench", "offline", "D", "F"]])
def test_cuda_without_cuda(argv, capsys, tmp_path, no_long_work):
    argv = [str(tmp_path / a) if a in ("D", "F", "O") else a for a in argv]
    one_line_error(capsys, argv + ["--device", "cuda"], "argument --device: 'cuda': no CUDA device is available to torch")
    if argv[0] == "compress":
        one_line_error(capsys, argv + ["--device", "cuda:3"], "no CUDA device is available")


@pytest.mark.gpu
def test_device_cuda_is_accepted_and_a_missing_index_refused(capsys):
    from factorlm.cli.common import device_type

    parse = device_type()
    assert parse("cuda") == "cuda" and parse("cuda:0") == "cuda:0"
    count = torch.cuda.device_count()
    one_line_error(capsys, ["compress", "D", "-o", "O", "--device", f"cuda:{count}"],
                   f"this machine has {count} CUDA device(s), numbered from 0")


def test_beta_needs_saes(dense, tmp_path, capsys, no_long_work):
    one_line_error(capsys, ["compress", str(dense), "-o", str(tmp_path / "o"), "--beta", "0.5"],
                   "--beta applies to --method saes only (got --method svd)")


def test_bad_corrector_is_found_before_loading(dense, tmp_path, capsys, no_long_work):
    one_line_error(capsys, ["compress", str(dense), "-o", str(tmp_path / "o"), "--corrector", "0"],
                   "--corrector must be 'auto' or a positive integer, got '0'")


def test_missing_required_argument_is_one_line(capsys):
    one_line_error(capsys, ["compress", "x"], "the following arguments are required: -o/--output")
    one_line_error(capsys, ["nope"], "argument COMMAND: invalid choice: 'nope'")


# ----------------------------------------------------------------------------- context length


def test_calib_len_above_context_is_refused_before_loading(dense, tmp_path, capsys, no_long_work):
    out = tmp_path / "o"
    line = one_line_error(capsys, ["compress", str(dense), "-o", str(out), "--method", "svd-llm", "--calib-len", "300"],
                          "--calib-len 300 exceeds the model's context length 256")
    assert str(dense / "config.json") in line and "use --calib-len 256 or less" in line
    assert not out.exists()


def test_calib_len_is_not_checked_when_nothing_calibrates(dense, tmp_path, capsys, monkeypatch):
    seen = {}
    monkeypatch.setattr("factorlm.compressor.pipeline.compress_checkpoint",
                        lambda *a, **k: seen.setdefault("called", True) and (tmp_path, {"totals": {}}))
    monkeypatch.setattr("factorlm.cli.compress.format_totals", lambda t: "")
    assert main(["compress", str(dense), "-o", str(tmp_path / "o"), "--calib-len", "300"]) == 0  # plain svd
    assert seen["called"]


def test_seq_len_above_context_is_refused_before_loading(dense, factored, tmp_path, capsys, no_long_work):
    one_line_error(capsys, ["finetune", str(factored), "--teacher", str(dense), "-o", str(tmp_path / "o"),
                            "--seq-len", "1000"], "--seq-len 1000 exceeds the model's context length 256")


def test_ppl_window_above_context_is_refused_before_loading(dense, capsys, no_long_work):
    one_line_error(capsys, ["eval", "ppl", str(dense), "--text", str(dense / "config.json")],
                   "--window 2048 exceeds the model's context length 256")


def test_context_length_keys(tmp_path):
    from factorlm.cli.common import context_length

    for config, expected in [({"max_position_embeddings": 4096}, 4096), ({"n_positions": 1024}, 1024),
                             ({"text_config": {"max_position_embeddings": 131072}}, 131072), ({}, None)]:
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert context_length(tmp_path) == expected


# ----------------------------------------------------------------------------- output paths


def _commands(dense, factored, out):
    return {
        "compress": ["compress", str(dense), "-o", str(out)],
        "finetune": ["finetune", str(factored), "--teacher", str(dense), "-o", str(out)],
        "export": ["export", "onnx", str(factored), "-o", str(out)],
        "fold": ["fold", str(factored), "-o", str(out)],
    }


COMMANDS = ["compress", "finetune", "export", "fold"]


@pytest.mark.parametrize("command", COMMANDS)
def test_parent_is_a_file(command, dense, factored, tmp_path, capsys, no_long_work):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "sub" / "out"
    one_line_error(capsys, _commands(dense, factored, out)[command],
                   f"{out}: cannot create it: {tmp_path / 'file'} is a file, not a folder")


@pytest.mark.parametrize("command", COMMANDS)
def test_output_is_a_file(command, dense, factored, tmp_path, capsys, no_long_work):
    out = tmp_path / "out"
    out.write_text("x")
    one_line_error(capsys, _commands(dense, factored, out)[command] + ["--overwrite"],
                   f"{out}: exists and is a file, not a folder")
    assert out.read_text() == "x"


@pytest.fixture
def unwritable(tmp_path):
    """A folder this process cannot create entries in (a read-only sysfs folder when running as root)."""
    if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses new entries
        target = "/sys/kernel"
        if not os.path.isdir(target) or _can_write(target):
            pytest.skip("no read-only folder available as root")
        yield target
        return
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    yield str(folder)
    folder.chmod(0o755)


def _can_write(folder):
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(dir=folder))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("command", COMMANDS)
def test_parent_not_writable(command, dense, factored, unwritable, capsys, no_long_work):
    out = os.path.join(unwritable, "new", "out")
    one_line_error(capsys, _commands(dense, factored, out)[command], f"{out}: cannot write in {unwritable}: ")


@pytest.mark.parametrize("command", ["compress", "finetune", "fold"])
def test_output_equal_to_input(command, dense, factored, capsys, no_long_work):
    src = factored if command != "compress" else dense
    one_line_error(capsys, _commands(dense, factored, src)[command] + ["--overwrite"],
                   "the output must be a different folder than the input")


def test_overwriting_a_folder_that_holds_the_input(tmp_path, capsys, no_long_work):
    src = save_tiny_dense(tmp_path / "work" / "dense")
    capsys.readouterr()
    one_line_error(capsys, ["compress", str(src), "-o", str(tmp_path / "work"), "--overwrite"],
                   f"replacing it would delete the input {src} inside it")
    assert (src / "config.json").is_file()


def test_file_outputs_are_checked(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    one_line_error(capsys, ["calib-text", "sample", "-o", str(tmp_path / "f" / "c.txt")], "is a file, not a folder")
    one_line_error(capsys, ["calib-text", "sample", "-o", str(tmp_path)], "is a folder; give a file name")


def test_compress_output_checked_before_sample_model_is_materialised(tmp_path, capsys, monkeypatch, no_long_work):
    def boom(*a, **k):
        raise AssertionError("the sample model was materialised before the output was checked")

    monkeypatch.setattr("factorlm.sample_model.materialize_sample_model", boom)
    (tmp_path / "f").write_text("x")
    one_line_error(capsys, ["compress", "sample", "-o", str(tmp_path / "f" / "o")], "is a file, not a folder")


# ----------------------------------------------------------------------------- inspect --verify


def test_inspect_verify_ok(factored, capsys):
    assert main(["inspect", str(factored), "--verify"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK: {factored}: ") and "14 factored modules" in out and "LlamaForCausalLM" in out


def test_inspect_verify_dense_folder(dense, capsys):
    assert main(["inspect", str(dense), "--verify"]) == 0
    assert "a dense model folder" in capsys.readouterr().out


def test_inspect_verify_lists_every_problem(factored, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    ck = shutil.copytree(factored, tmp_path / "ck")
    tensors = load_file(ck / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight_u"]
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, ck / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((ck / "config.json").read_text())
    del cfg["quantization_config"]["ranks"]["model.layers.1.mlp.down_proj"]
    (ck / "config.json").write_text(json.dumps(cfg))
    assert main(["inspect", str(ck), "--verify"]) == 2
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 3
    assert "'model.layers.1.mlp.down_proj.weight_u' is a factor of module 'model.layers.1.mlp.down_proj', which " \
           "'ranks' in config.json does not list" in lines[0]
    assert any("missing tensor 'model.layers.0.mlp.up_proj.weight_u'" in line for line in lines)
    assert any("tensor 'model.norm.weight' has shape (65,), module expects (64,)" in line for line in lines)
    assert captured.err == f"factorlm: error: {ck}: 3 problems\n"


def test_inspect_verify_truncated_file(factored, tmp_path, capsys):
    ck = shutil.copytree(factored, tmp_path / "ck")
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["inspect", str(ck), "--verify"]) == 2
    out = capsys.readouterr().out
    assert f"{ck / 'model.safetensors'}: truncated safetensors file" in out


def test_inspect_verify_not_a_model_folder(tmp_path, capsys):
    one_line_error(capsys, ["inspect", str(tmp_path / "nope"), "--verify"], "checkpoint folder not found")
    one_line_error(capsys, ["inspect", str(tmp_path), "--verify"], "config.json: not found")


def test_inspect_without_verify_still_reads_the_report(dense, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["compress", str(dense), "-o", str(out), "--keep", "0.5", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "linear-layer parameters" in capsys.readouterr().out
    assert main(["inspect", str(out), "--verify"]) == 0  # what compress writes verifies


# ----------------------------------------------------------------------------- readers through the CLI


def _truncated(factored, tmp_path):
    ck = shutil.copytree(factored, tmp_path / "ck")
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) - 1000])
    return ck


@pytest.mark.parametrize("argv", [["generate", "CK", "--prompt", "hi"], ["eval", "ppl", "CK", "--text", "CK/config.json",
                                                                          "--window", "32"]])
def test_truncated_checkpoint_is_one_line_naming_the_file(argv, factored, tmp_path, capsys):
    ck = _truncated(factored, tmp_path)
    argv = [a.replace("CK", str(ck)) for a in argv]
    one_line_error(capsys, argv, f"{ck / 'model.safetensors'}: truncated safetensors file")


def test_export_onnx_names_a_truncated_file(factored, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    ck = _truncated(factored, tmp_path)
    one_line_error(capsys, ["export", "onnx", str(ck), "-o", str(tmp_path / "onnx")],
                   f"{ck / 'model.safetensors'}: truncated safetensors file")
    assert not (tmp_path / "onnx").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_registries_match_the_cli_choices():
    from factorlm.cli.compress import ALLOCATION_NAMES, METHOD_NAMES
    from factorlm.compressor.allocation import ALLOCATORS
    from factorlm.compressor.methods import METHODS

    assert METHOD_NAMES == tuple(METHODS), "add the new method to factorlm.cli.compress.METHOD_NAMES"
    assert ALLOCATION_NAMES == tuple(ALLOCATORS), "add the new allocator to factorlm.cli.compress.ALLOCATION_NAMES"
