"""``factorlm bench pareto`` end to end on a tiny model: quality, speed, table, JSON, plot, resume from cache."""

import json

import pytest

from factorlm.bench import pareto_run
from factorlm.cli import main
from factorlm.eval.tasks import TASKS, Doc, TaskSpec, register_task
from factorlm.testing import save_tiny_dense, write_tiny_factored

ROWS = [{"q": f"the {w} is", "choices": [" red", " blue", " green"], "gold": i % 3}
        for i, w in enumerate(["sky", "sea", "leaf", "rose", "lake", "grass"])]


@pytest.fixture
def tiny_task():
    register_task(TaskSpec("tiny_colours", lambda: ROWS,
                           lambda r: Doc(tuple(r["q"] for _ in r["choices"]), tuple(r["choices"]), r["gold"]), "test"))
    yield "tiny_colours"
    TASKS.pop("tiny_colours", None)


def test_pareto_end_to_end_and_resume(tmp_path, tiny_task, monkeypatch):
    dense = save_tiny_dense(tmp_path / "dense")
    fact = write_tiny_factored(tmp_path / "k", rank=4)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 40))
    out = tmp_path / "out"
    argv = ["bench", "pareto", str(dense), "--checkpoint", f"r4={fact}", "--text", str(text), "--ppl-tokens", "128",
            "--zeroshot-limit", "4", "--tasks", tiny_task, "--engines", "torch", "--batch", "1,2",
            "--prompt-tokens", "4", "--new-tokens", "4", "--repeats", "1", "--output-dir", str(out),
            "--cache", str(tmp_path / "cache")]
    assert main(argv) == 0
    sweep = json.loads((out / "pareto.json").read_text())
    dense_row, point = sweep["rows"]
    assert dense_row["name"] == "dense" and point["name"] == "r4"
    assert point["weight_bytes"] < dense_row["weight_bytes"] and point["bytes_ratio"] > 1
    assert point["ppl"] != dense_row["ppl"] and point["ppl"] > 1
    assert 0 <= point["zeroshot_average"] <= 1 and set(point["zeroshot_tasks"]) == {tiny_task}
    assert set(point["engines"]) == {"torch/b1", "torch/b2"}
    assert point["engines"]["torch/b1"]["speedup"] > 0 and dense_row["engines"]["torch/b2"]["decode_tok_s"] > 0
    table = (out / "pareto.md").read_text()
    assert "| r4 |" in table and "torch/b2 tok/s (speedup)" in table
    assert (out / "pareto.png").stat().st_size > 1000

    # rerun: every score comes from the cache, nothing is measured again
    monkeypatch.setattr(pareto_run, "run_offline", lambda *a, **k: pytest.fail("speed measured again"))
    monkeypatch.setattr("factorlm.eval.perplexity.perplexity", lambda *a, **k: pytest.fail("ppl measured again"))
    assert main(argv) == 0
    again = json.loads((out / "pareto.json").read_text())
    assert again["rows"][1]["ppl"] == point["ppl"]


def test_pareto_bad_input_exits_2(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello world")
    assert main(["bench", "pareto", "--checkpoint", "x", "--text", str(text)]) == 2
    assert "NAME=DIR" in capsys.readouterr().err
    assert main(["bench", "pareto", "--checkpoint", f"x={tmp_path}", "--text", str(text)]) == 2
    assert "config.json not found" in capsys.readouterr().err


def test_peer_rows_are_gathered_from_every_point_run_and_rendered_without_quality():
    """A model that is neither dense nor factored (llama.cpp on the GGUF) becomes its own row: the
    median of its tok/s over the points' runs, no perplexity, and no line in the plot's sweep."""
    def run(gguf_tok_s):
        return {"results": [{"engine": "torch", "model": "dense", "batch": 1, "decode_tok_s": 10.0, "weight_bytes": 400},
                            {"engine": "torch", "model": "factored", "batch": 1, "decode_tok_s": 12.0, "weight_bytes": 300},
                            {"engine": "llamacpp", "model": "gguf-q4_1", "batch": 1, "decode_tok_s": gguf_tok_s,
                             "weight_bytes": 100}],
                "ratios": [{"engine": "torch", "batch": 1, "decode_speedup": 1.2}]}

    refs = pareto_run.reference_rows({"a": run(30.0), "b": run(40.0), "c": run(35.0)})
    assert [r["name"] for r in refs] == ["gguf-q4_1"]
    assert refs[0]["engines"] == {"llamacpp/b1": {"decode_tok_s": 35.0, "runs": 3}}
    assert refs[0]["ppl"] is None and refs[0]["weight_bytes"] == 100
    sweep = {"settings": {"ppl_tokens": 8, "ppl_window": 8, "text": "t.txt", "zeroshot_limit": 0, "tasks": [],
                          "prompt_tokens": 4, "new_tokens": 4, "repeats": 1, "threads": 1},
             "machine": {"cpu_count": 2, "loadavg_start": [1.0], "loadavg_end": [1.0]},
             "rows": [{"name": "dense", "kind": "dense", "weight_bytes": 400, "ppl": 10.0,
                       "engines": {"torch/b1": {"decode_tok_s": 10.0}}},
                      {"name": "k", "kind": "factored", "weight_bytes": 300, "bytes_ratio": 4 / 3, "ppl": 12.0,
                       "engines": {"torch/b1": {"decode_tok_s": 12.0, "speedup": 1.2}}},
                      {**refs[0], "bytes_ratio": 4.0}]}
    md = pareto_run.format_markdown(sweep)
    line = next(x for x in md.splitlines() if x.startswith("| gguf-q4_1 |"))
    assert line.split(" | ")[2:5] == ["4.00x", "-", "-"] and "35.0" in line
    assert "| k | 0.0 | 1.33x | 12.00 | 1.20x |" in md


def test_onnx_int8_engine_runs_a_quantized_checkpoint_on_its_stored_codes(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from factorlm.bench.runner import BenchConfig
    from factorlm.compressor.quantize import quantize_checkpoint

    monkeypatch.setenv("FACTORLM_CACHE", str(tmp_path / "cache"))
    src = write_tiny_factored(tmp_path / "f", rank=16)
    quantize_checkpoint(src, tmp_path / "q8", bits=8)
    runner = pareto_run.load_onnx_int8(tmp_path / "q8", "factored", BenchConfig(engines=["onnx-int8"], threads=1))
    meta = runner.gen.meta
    assert meta["quantization"]["source"] == "stored codes and scales"
    assert meta["quantization"]["accuracy_level"] == 4
    assert runner.run([[5, 17, 33, 2]], 3).decode_s > 0
    runner.close()
