"""Decode tok/s of the ``factorlm generate`` path, before (a reference checkout given by --before-src)
and after (this tree), eager and ``--compile``, batch 1, one thread, interleaved; medians.

    python benchmarks/bench_decode.py MODEL_DIR [MODEL_DIR ...] --before-src OLD/src --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import sys, time, json, torch
torch.set_num_threads(1)
from factorlm.runtime.checkpoint import load_model
from factorlm.runtime.generate import SamplingParams, GenerationStats, generate_tokens
model = load_model(sys.argv[1]); compile = sys.argv[2] == "1"; n = int(sys.argv[3])
ids = torch.arange(100, 132).view(1, -1)
p = SamplingParams(max_new_tokens=n, ignore_eos=True)
kw = {"compile": True} if compile else {}
list(generate_tokens(model, ids, p, **kw))  # warm-up (and compile)
rates = []
for _ in range(3):
    s = GenerationStats(); list(generate_tokens(model, ids, p, stats=s, **kw)); rates.append(s.decode_tokens_per_s)
print(json.dumps(sorted(rates)[1]))
"""


def measure(src: str, model: str, compile: bool, new_tokens: int) -> float:
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, model, "1" if compile else "0", str(new_tokens)],
                         env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--before-src", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/decode")
    args = ap.parse_args()
    after = str(Path(__file__).resolve().parents[1] / "src")
    cells = [(m, name, src, c) for m in args.models
             for name, src, c in (("before", args.before_src, False), ("after", after, False),
                                  ("after --compile", after, True))]
    rates: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for model, name, src, c in cells:
            rates.setdefault(f"{Path(model).name} | {name}", []).append(measure(src, model, c, args.new_tokens))
    load = Path("/proc/loadavg").read_text().split()[:3]
    result = {"rates": rates, "medians": {k: statistics.median(v) for k, v in rates.items()}, "loadavg": load,
              "new_tokens": args.new_tokens, "prompt_tokens": 32, "threads": 1, "batch": 1}
    Path(args.out + ".json").write_text(json.dumps(result, indent=2))
    lines = ["# Decode tok/s, `factorlm generate` path (batch 1, one thread, medians)", "",
             f"`python benchmarks/bench_decode.py ... --rounds {args.rounds}`; load average {' '.join(load)}", "",
             "| model | path | decode tok/s |", "|---|---|---|"]
    lines += [f"| {k.split(' | ')[0]} | {k.split(' | ')[1]} | {v:.1f} |" for k, v in result["medians"].items()]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
