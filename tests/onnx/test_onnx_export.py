"""ONNX export + ONNX Runtime generator on tiny models of every architecture in the table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from factorlm.cli import main  # noqa: E402
from factorlm.exporters.onnx import OnnxGenerator, export_onnx  # noqa: E402
from factorlm.exporters.onnx.export import make_session  # noqa: E402
from factorlm.exporters.onnx.validate import ValidationError, validate_graph  # noqa: E402
from factorlm.runtime.checkpoint import load_model  # noqa: E402
from factorlm.runtime.format import FactorlmError  # noqa: E402
from factorlm.runtime.generate import SamplingParams, generate_tokens  # noqa: E402
from factorlm.testing import TINY_CONFIGS, save_tiny_dense, write_tiny_factored  # noqa: E402

ARCHS = sorted(TINY_CONFIGS)
GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, dict]]:
    """Lazily export each architecture once per module: arch -> (checkpoint, onnx dir, metadata)."""
    cache: dict[str, tuple[Path, Path, dict]] = {}
    root = tmp_path_factory.mktemp("onnx")

    def get(arch: str) -> tuple[Path, Path, dict]:
        if arch not in cache:
            ckpt = write_tiny_factored(root / f"{arch}-ckpt", arch)
            meta = export_onnx(ckpt, root / f"{arch}-onnx", threads=1)
            cache[arch] = (ckpt, root / f"{arch}-onnx", meta)
        return cache[arch]

    return get  # type: ignore[return-value]


def _matmul_weights(onnx_dir: Path) -> list[tuple[int, ...]]:
    import onnx

    graph = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph
    shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    return [shapes[n.input[1]] for n in graph.node if n.op_type == "MatMul" and n.input[1] in shapes]


@pytest.mark.parametrize("arch", ARCHS)
def test_factored_export_validates_and_greedy_matches_torch(exported, arch: str) -> None:
    ckpt, out, meta = exported(arch)
    v = meta["validation"]
    assert v["max_abs_diff"] < 1e-3 and v["argmax_mismatches"] == 0
    assert v["cases"] == ["b1-p1", "b1-p17", "b1-p64", "b3-p1", "b3-p17", "b3-p64"]
    for name in ("model.onnx", "factorlm_onnx.json", "genai_config.json", "tokenizer.json", "config.json"):
        assert (out / name).is_file(), name
    assert meta["factored"] and meta["ranks"]
    # every factored linear is two MatMuls against its factors, never densified: its own [r, out]
    # second factor, and a first factor [in, r] that may be joined with its siblings' (q/k/v,
    # gate/up share their input) into one [in, sum r] MatMul
    weights = _matmul_weights(out)
    model = load_model(ckpt)
    cfg = model.config
    assert sum(1 for s in weights if s[0] == 16) == len(meta["ranks"])
    assert not any(s == (cfg.hidden_size, cfg.intermediate_size) for s in weights)
    layers = cfg.num_hidden_layers
    assert meta["fusions"]["matmul_groups"] == 2 * layers  # q/k/v and gate/up of every block
    assert meta["fusions"]["norm_ops"] >= 2 * layers + 1

    ids = torch.randint(3, cfg.vocab_size, (1, 11), generator=torch.Generator().manual_seed(1))
    want = list(generate_tokens(model, ids, GREEDY))
    gen = OnnxGenerator(out, threads=1, device="cpu")
    assert list(gen.generate_tokens(ids, GREEDY)) == want


def test_batch_generation_with_left_padding_matches_single(exported) -> None:
    _, out, _ = exported("llama")
    gen = OnnxGenerator(out, threads=1, device="cpu")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33]]
    batched = gen.generate_batch(prompts, GREEDY)
    assert batched == [list(gen.generate_tokens(p, GREEDY)) for p in prompts]


def test_sampling_is_seeded_and_stops(exported) -> None:
    _, out, _ = exported("llama")
    gen = OnnxGenerator(out, threads=1, device="cpu")
    params = SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, top_k=50, seed=3, ignore_eos=True)
    a = list(gen.generate_tokens([5, 6, 7], params))
    assert a == list(gen.generate_tokens([5, 6, 7], params)) and len(a) == 8
    first = list(gen.generate_tokens([5, 6, 7], GREEDY))[0]
    stopped = list(gen.generate_tokens([5, 6, 7], SamplingParams(max_new_tokens=5, stop_token_ids=[first])))
    assert stopped == []


def test_validation_failure_names_worst_position(exported) -> None:
    ckpt, out, _ = exported("llama")

    class Skewed:
        """A session whose logits are off at one decode position."""

        def __init__(self, session):
            self.s = session

        def get_inputs(self):
            return self.s.get_inputs()

        def run(self, names, feed):
            outs = self.s.run(names, feed)
            if feed["input_ids"].shape == (3, 1) and feed["attention_mask"].shape[1] == 19:
                outs[0] = outs[0].copy()
                outs[0][1, 0, 7] += 0.5
            return outs

    model = load_model(ckpt, fast_layout=False)
    with pytest.raises(ValidationError, match=r"batch 3, prompt length 17, decode step 2, row 1, position 18"):
        validate_graph(Skewed(make_session(out / "model.onnx", threads=1)), model, "fp32")


def test_dense_model_exports(tmp_path: Path) -> None:
    dense = save_tiny_dense(tmp_path / "dense", "qwen3")
    meta = export_onnx(dense, tmp_path / "out", threads=1)
    assert not meta["factored"] and meta["validation"]["argmax_mismatches"] == 0
    model = load_model(dense)
    weights = _matmul_weights(tmp_path / "out")
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    assert (inter, hidden) in weights and (hidden, 2 * inter) in weights  # gate and up joined: one MatMul
    assert list(OnnxGenerator(tmp_path / "out", device="cpu").generate_tokens([4, 5, 6], GREEDY)) == \
        list(generate_tokens(model, torch.tensor([[4, 5, 6]]), GREEDY))


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_bad_input_gets_clear_errors_and_no_partial_output(tmp_path: Path, exported, monkeypatch) -> None:
    ckpt, out, _ = exported("llama")
    with pytest.raises(FactorlmError, match="checkpoint folder not found"):
        export_onnx(tmp_path / "missing", tmp_path / "o1")
    with pytest.raises(FactorlmError, match="unsupported opset 9"):
        export_onnx(ckpt, tmp_path / "o2", opset=9)
    with pytest.raises(FactorlmError, match="output already exists"):
        export_onnx(ckpt, out)
    assert _siblings(tmp_path) == []

    from factorlm.exporters.onnx import export as export_mod

    def fail(*args, **kwargs):
        raise ValidationError("ONNX Runtime logits differ from PyTorch at batch 1, position 0")

    monkeypatch.setattr(export_mod, "validate_graph", fail)
    with pytest.raises(ValidationError):
        export_onnx(ckpt, tmp_path / "o3", threads=1)
    assert _siblings(tmp_path) == []  # neither the output nor the temp folder is left behind


def test_cli_export_errors_and_generate_engine_onnx(tmp_path: Path, exported, capsys) -> None:
    ckpt, out, _ = exported("llama")
    assert main(["export", "onnx", str(ckpt), "-o", str(out)]) == 2
    assert "output already exists" in capsys.readouterr().err
    assert main(["export", "onnx", str(tmp_path / "nope"), "-o", str(tmp_path / "x"), "--opset", "99"]) == 2
    assert "unsupported opset 99" in capsys.readouterr().err
    assert main(["export", "onnx", str(tmp_path / "nope"), "-o", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    args = ["--prompt", "The quick brown fox", "--max-new-tokens", "8", "--threads", "1"]
    assert main(["generate", str(ckpt), *args]) == 0
    torch_text = capsys.readouterr().out
    assert main(["generate", str(out), "--engine", "onnx", "--onnx-device", "cpu", *args]) == 0
    assert capsys.readouterr().out == torch_text


def test_metadata_describes_io(exported) -> None:
    _, out, _ = exported("llama")
    meta = json.loads((out / "factorlm_onnx.json").read_text())
    names = [i["name"] for i in meta["inputs"]]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert [o["name"] for o in meta["outputs"]][:2] == ["logits", "present.0.key"]
    session = make_session(out / "model.onnx")
    assert [i.name for i in session.get_inputs()] == names
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is False


@pytest.mark.slow
@pytest.mark.parametrize("dtype,int8", [("fp32", True), ("fp16", False)])
def test_int8_and_fp16_exports_run(tmp_path: Path, dtype: str, int8: bool) -> None:
    ckpt = write_tiny_factored(tmp_path / "ckpt", "llama")
    meta = export_onnx(ckpt, tmp_path / "out", dtype=dtype, int8=int8, threads=1)
    assert meta["int8"] == int8 and meta["dtype"] == dtype
    assert np.isfinite(meta["validation"]["max_abs_diff"])
    tokens = OnnxGenerator(tmp_path / "out", device="cpu").generate_tokens([4, 5, 6], GREEDY)
    assert len(list(tokens)) == GREEDY.max_new_tokens


@pytest.mark.gpu
def test_cuda_provider_keeps_cache_on_device(exported) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu with the CUDA execution provider is not installed")
    ckpt, out, _ = exported("llama")
    gen = OnnxGenerator(out, device="cuda")
    assert gen.device == "cuda"
    model = load_model(ckpt)
    ids = torch.tensor([[4, 5, 6, 7]])
    assert list(gen.generate_tokens(ids, GREEDY)) == list(generate_tokens(model, ids, GREEDY))
