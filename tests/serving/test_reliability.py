"""Short runs of the fuzz and soak scripts on the tiny model (slow-marked; the committed results come from
longer runs on the sample model)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_schema_fuzz_has_no_5xx(tmp_path):
    pytest.importorskip("schemathesis")
    out = tmp_path / "fuzz"
    assert _load("fuzz_server").main(["--examples", "25", "--out", str(out)]) == 0
    (run,) = json.loads(out.with_suffix(".json").read_text())["engines"]
    assert run["count_5xx"] == 0 and run["server_5xx_in_metrics"] == 0 and run["total_cases"] >= 100


@pytest.mark.slow
def test_short_soak_has_no_errors(tmp_path):
    out = tmp_path / "soak"
    code = _load("soak_server").main(["--clients", "8", "--duration", "15", "--warmup", "5", "--out", str(out)])
    (result,) = json.loads(out.with_suffix(".json").read_text())["engines"]
    assert result["errors"] == 0 and result["server_5xx"] == 0 and result["completed"] > 0
    assert code == 0
