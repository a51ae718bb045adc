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
