"""bench_quality.py and quality_report.py: grids, cache keys, the report table, a failing config contained."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest



def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[2] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bq = _load("bench_quality")
qr = _load("quality_report")


def _scores(ppl: float, accs: dict[str, float], params: int) -> dict:
    tasks = {t: {"acc": a, "acc_norm": (a if t == "piqa" else None), "n": 4, "acc_stderr": None}
             for t, a in accs.items()}
    return {"ppl": ppl, "params": params, "zeroshot": {"tasks": tasks, "average": sum(accs.values()) / len(accs)}}


def test_grids_have_unique_names_and_method_flags():
    for name, grid in bq.GRIDS.items():
        configs = grid([0.9, 0.8])
        assert len({c[0] for c in configs}) == len(configs), name
    assert ("svd-llm-k0.9", ["--method", "svd-llm", "--keep", "0.9"]) in bq.grid_methods([0.9])
    # the allocation grid's uniform row is the methods grid's saes row: one cached checkpoint
    assert ("saes-k0.9", ["--method", "saes", "--keep", "0.9"]) in bq.grid_allocation([0.9])
    assert {c[0] for c in bq.grid_allocation([0.9])} == {"saes-k0.9", "saes-energy-k0.9", "saes-greedy-k0.9",
                                                         "saes-mgaa-k0.9", "saes-ara-k0.9"}
    assert bq.config_dir("a", ["--keep", "0.9"]) == bq.config_dir("a", ["--keep", "0.9"])
    assert bq.config_dir("a", ["--keep", "0.9"]) != bq.config_dir("a", ["--keep", "0.8"])


def test_report_rows_retention_and_markdown(tmp_path):
    entries = [{"name": "dense", "scores": _scores(20.0, {"piqa": 0.6, "boolq": 0.6}, 100)},
               {"name": "svd-k0.9", "scores": _scores(90.0, {"piqa": 0.5, "boolq": 0.4}, 92),
                "compress": {"wall_s": 12.0, "peak_rss_mib": 900.0, "command": "factorlm compress sample ..."}},
               {"name": "broken", "error": "factorlm compress: error: unrecognized arguments: --corrector auto"}]
    qr.report_rows(entries, 100)
    assert abs(entries[1]["model_removed"] - 0.08) < 1e-12 and abs(entries[1]["retention"] - 0.75) < 1e-12
    rows = qr.flat_rows(entries)
    assert [r["config"] for r in rows] == ["dense", "svd-k0.9"] and rows[0]["linear_kept_actual"] == 1.0
    assert rows[1]["wikitext2_ppl"] == 90.0 and rows[1]["piqa_acc_norm"] == 0.5 and "boolq_acc_norm" not in rows[1]
    meta = {"name": "t", "settings": {"tasks": ["piqa", "boolq"], "ppl_tokens": 8192, "threads": 1},
            "calibration": "c", "zeroshot_note": "z", "cpu": "x", "load_start": [1], "load_end": [1], "wall_s": 3.0,
            "command": "python benchmarks/bench_quality.py"}
    md = tmp_path / "q.md"
    qr.write_markdown(md, entries, meta)
    text = md.read_text()
    assert "| svd-k0.9 | 8.00 | - | 90.000 | 0.500 / 0.500 | 0.400 / - | 0.4500 | 0.750 | - | - | 12.0 | - | 900 |" in text
    assert "| broken | failed: factorlm compress: error: unrecognized arguments: --corrector auto |" in text


def test_report_reads_allocation_from_the_checkpoint_report(tmp_path):
    folder = tmp_path / "saes-mgaa-k0.9"
    folder.mkdir()
    totals = {"method": "saes", "allocation": "mgaa", "linear_keep": 0.9, "dense_modules": 12,
              "allocation_time_s": 61.5}
    (folder / "factorlm_report.json").write_text(json.dumps({"layers": [], "totals": totals}))
    entries = [{"name": "dense", "scores": _scores(20.0, {"piqa": 0.6}, 100)},
               {"name": "saes-mgaa-k0.9", "dir": str(folder), "scores": _scores(30.0, {"piqa": 0.5}, 92),
                "compress": {"wall_s": 100.0}}]
    qr.report_rows(entries, 100)
    row = qr.flat_rows(entries)[1]
    assert (row["allocation"], row["dense_modules"], row["allocation_s"], row["linear_kept_actual"]) == \
        ("mgaa", 12, 61.5, 0.9)
    meta = {"name": "t", "settings": {"tasks": ["piqa"], "ppl_tokens": 8192, "threads": 1}, "calibration": "c",
            "zeroshot_note": "z", "cpu": "x", "load_start": [1], "load_end": [1], "wall_s": 3.0, "command": "c"}
    qr.write_markdown(tmp_path / "q.md", entries, meta)
    assert "| 0.833 | mgaa (12) | 61.5 | 100.0 |" in (tmp_path / "q.md").read_text()


def test_public_hides_home_and_text_path():
    home = str(Path.home())
    out = qr.public({"dir": f"{home}/.cache/x", "cmd": "--wikitext /data/wiki.raw"}, "/data/wiki.raw")
    assert out == {"dir": "~/.cache/x", "cmd": "--wikitext WIKI"}


@pytest.mark.slow  # a subprocess that imports the CLI: ~20 s on a busy 2-core machine
def test_unknown_compressor_flag_fails_only_that_config(tmp_path, monkeypatch):
    monkeypatch.setattr(bq, "QUALITY", tmp_path)
    res = bq.compress("bad", ["--method", "svd", "--no-such-flag", "1"], threads=1)
    assert "unrecognized arguments: --no-such-flag" in res["error"]
    assert not list(tmp_path.glob("bad-*/config.json"))
    json.dumps(res)


def test_stale_score_lock_is_detected(tmp_path):
    import os

    lock = tmp_path / "x.lock"
    lock.write_text(str(os.getpid()))
    assert bq._lock_owner_alive(lock)
    lock.write_text("999999999")
    assert not bq._lock_owner_alive(lock)
    lock.write_text("")
    assert bq._lock_owner_alive(lock)  # just created, pid not written yet


def test_average_stderr_combines_tasks():
    zs = {"tasks": {"a": {"acc_stderr": 0.3}, "b": {"acc_stderr": 0.4}}}
    assert abs(qr.avg_stderr(zs) - 0.25) < 1e-12  # sqrt(0.09 + 0.16) / 2
    assert qr.avg_stderr({"tasks": {"a": {"acc_stderr": None}}}) is None


def test_finetuned_rows_get_their_own_columns_and_commands(tmp_path):
    entries = [{"name": "dense", "scores": _scores(20.0, {"piqa": 0.6}, 100)},
               {"name": "saes-mgaa-k0.8", "scores": _scores(110.0, {"piqa": 0.5}, 92),
                "compress": {"wall_s": 100.0, "command": "factorlm compress sample -o A"}},
               {"name": "saes-mgaa-k0.8-ft60", "scores": _scores(60.0, {"piqa": 0.55}, 92),
                "compress": {"wall_s": 100.0, "command": "factorlm compress sample -o A", "cached": True},
                "finetune": {"wall_s": 900.0, "held_out_kl": [0.52, 0.31], "command": "factorlm finetune A -o B"}}]
    qr.report_rows(entries, 100)
    meta = {"name": "t", "settings": {"tasks": ["piqa"], "ppl_tokens": 8192, "threads": 1}, "calibration": "c",
            "zeroshot_note": "z", "cpu": "x", "load_start": [1], "load_end": [1], "wall_s": 3.0, "command": "c"}
    qr.write_markdown(tmp_path / "q.md", entries, meta)
    text = (tmp_path / "q.md").read_text()
    assert "finetune s | held-out KL before -> after |" in text
    assert "| 900.0 | 0.5200 -> 0.3100 |" in text and text.count("factorlm finetune A -o B") == 1
    assert bq.FINETUNE == "+finetune"


def test_retention_above_chance_counts_only_the_margin_over_guessing(tmp_path):
    chance = {"piqa": 0.5, "hellaswag": 0.25}
    entries = [{"name": "dense", "scores": _scores(20.0, {"piqa": 0.7, "hellaswag": 0.45}, 100)},
               {"name": "c", "scores": _scores(90.0, {"piqa": 0.6, "hellaswag": 0.25}, 80)},
               {"name": "guess", "scores": _scores(900.0, {"piqa": 0.5, "hellaswag": 0.25}, 80)}]
    qr.report_rows(entries, 100, chance)
    assert entries[1]["above_chance"] == pytest.approx(0.1 / 0.4)
    assert entries[2]["above_chance"] == pytest.approx(0.0) and entries[2]["retention"] == pytest.approx(0.75 / 1.15)
    assert qr.flat_rows(entries)[1]["retention_above_chance"] == pytest.approx(0.25)
    meta = {"name": "t", "settings": {"tasks": list(chance), "ppl_tokens": 8192, "threads": 1}, "calibration": "c",
            "zeroshot_note": "z", "cpu": "x", "load_start": [1], "load_end": [1], "wall_s": 3.0, "command": "c",
            "chance": chance}
    qr.write_markdown(tmp_path / "q.md", entries, meta)
    text = (tmp_path / "q.md").read_text()
    assert "| retention | retention above chance |" in text and "| 0.652 | 0.000 |" in text
    assert "piqa 0.500, hellaswag 0.250, average 0.375" in text
    assert qr.above_chance_retention({"piqa": {"acc": 0.5}}, {"piqa": {"acc": 0.5}}, {"piqa": 0.5}) is None
