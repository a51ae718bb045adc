"""Pareto sweep of the sample model: quality and decode speed per operating point (thin driver).

Runs ``factorlm bench pareto`` (``factorlm.bench.pareto_run``) and writes results/pareto.{md,json,png}.
Every argument is passed through, e.g.

    python benchmarks/bench_pareto.py --checkpoint k0.8=CKPT_DIR --keep 0.9 \
        --text wikitext-2-raw/wiki.test.raw --engines torch,onnx,onnx-int8 --batch 1,8
"""

from __future__ import annotations

import sys
from pathlib import Path

from factorlm.cli import main

RESULTS = Path(__file__).parent / "results"

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--output-dir" not in argv:
        argv += ["--output-dir", str(RESULTS)]
    sys.exit(main(["bench", "pareto", *argv]))
