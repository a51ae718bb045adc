"""Decode tok/s of ``factorlm generate`` and of ``factorlm serve`` (torch engine), before (a reference
checkout given by --before-src) and after (this tree), eager and ``--compile``; batch 1, one thread,
every cell a fresh process, cells interleaved round by round; medians over rounds.

    python benchmarks/bench_decode.py MODEL_DIR [MODEL_DIR ...] --before-src OLD/src --rounds 3

``generate``: the library path of the command (``stream_text``: decode loop, sampler, text
stream), its ``GenerationStats.decode_tokens_per_s``. ``serve``: a streamed
``/v1/completions`` request over HTTP to an in-process server, (tokens - 1) / (last chunk -
first chunk). Each cell warms up once (that compiles with ``--compile``) and reports the
median of three timed requests. A cell the reference tree cannot run (``serve --compile``
before it existed) is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

GENERATE = r"""
import sys, json, torch
torch.set_num_threads(1)
from factorlm.runtime.checkpoint import load_model, load_tokenizer
from factorlm.runtime.generate import SamplingParams, GenerationStats, stream_text
model, tok = load_model(sys.argv[1]), load_tokenizer(sys.argv[1]); compile = sys.argv[2] == "1"; n = int(sys.argv[3])
ids = torch.arange(100, 132).view(1, -1)
p = SamplingParams(max_new_tokens=n, ignore_eos=True)
kw = {"compile": True} if compile else {}
"".join(stream_text(model, tok, ids, p, **kw))  # warm-up (and compile)
rates = []
for _ in range(3):
    s = GenerationStats(); "".join(stream_text(model, tok, ids, p, stats=s, **kw)); rates.append(s.decode_tokens_per_s)
print(json.dumps(sorted(rates)[1]))
"""

SERVE = r"""
import sys, json, time, httpx
from factorlm.serving.app import create_app
from factorlm.serving.engines import EngineOptions, create_engine
from factorlm.serving.server import BackgroundServer
compile = sys.argv[2] == "1"; n = int(sys.argv[3])
kw = {"compile": True} if compile else {}
engine = create_engine("torch", sys.argv[1], EngineOptions(threads=1, max_batch=1, **kw))
body = {"model": engine.model_name, "prompt": list(range(100, 132)), "max_tokens": n, "temperature": 0,
        "ignore_eos": True, "stream": True}

def once(client):
    first = last = None
    with client.stream("POST", "/v1/completions", json=body) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0].get("text"):
                last = time.perf_counter()
                first = first or last
    return (n - 1) / (last - first)

with BackgroundServer(create_app(engine)) as url, httpx.Client(base_url=url, timeout=900) as client:
    once(client)  # warm-up (and compile)
    rates = [once(client) for _ in range(3)]
print(json.dumps(sorted(rates)[1]))
"""

CELLS = [("generate", "before", False), ("generate", "after", False), ("generate", "before", True),
         ("generate", "after", True), ("serve", "before", False), ("serve", "after", False),
         ("serve", "after", True)]


def measure(src: str, model: str, path: str, compile: bool, new_tokens: int) -> float:
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
    child = GENERATE if path == "generate" else SERVE
    out = subprocess.run([sys.executable, "-c", child, model, "1" if compile else "0", str(new_tokens)],
                         env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def cell_name(model: str, path: str, tree: str, compile: bool) -> str:
    return f"{Path(model).name} | {path} | {tree}{' --compile' if compile else ''}"


def ratios(medians: dict[str, float]) -> dict[str, float]:
    """after / before for every cell measured in both trees."""
    out = {}
    for key, value in medians.items():
        before = key.replace("| after", "| before")
        if "| after" in key and before in medians:
            out[key.replace("| after", "| after/before")] = value / medians[before]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--before-src", required=True)
    ap.add_argument("--after-src", default=str(Path(__file__).resolve().parents[1] / "src"),
                    help="the tree measured as 'after' (default: this checkout)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/decode")
    args = ap.parse_args()
    trees = {"before": args.before_src, "after": args.after_src}
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    rates: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for model in args.models:
            for path, tree, compile in CELLS:
                name = cell_name(model, path, tree, compile)
                rates.setdefault(name, []).append(measure(trees[tree], model, path, compile, args.new_tokens))
                print(f"round {r + 1}: {name}: {rates[name][-1]:.2f} tok/s", file=sys.stderr, flush=True)
        write(args, rates, load_start, r + 1)  # after every round, so an interrupted run keeps its rounds


def write(args: argparse.Namespace, rates: dict[str, list[float]], load_start: list[str], rounds: int) -> None:
    load = Path("/proc/loadavg").read_text().split()[:3]
    medians = {k: statistics.median(v) for k, v in rates.items()}
    result = {"command": "python benchmarks/bench_decode.py " + " ".join(Path(m).name for m in args.models)
              + f" --before-src BEFORE/src --rounds {rounds} --new-tokens {args.new_tokens}",
              "rates": rates, "medians": medians, "after_over_before": ratios(medians),
              "loadavg_start": load_start, "loadavg_end": load, "new_tokens": args.new_tokens, "prompt_tokens": 32,
              "threads": 1, "batch": 1}
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Decode tok/s: `factorlm generate` and `factorlm serve` (batch 1, one thread, medians)", "",
             f"`{result['command']}`; before = the tree before the decode core was shared by the server, "
             f"the ONNX generator and the benchmark runners; load average {' '.join(load_start)} at the start, "
             f"{' '.join(load)} at the end; {args.new_tokens} new tokens after a 32-token prompt.", "",
             "| model | path | tree | decode tok/s | rounds | after / before |", "|---|---|---|---|---|---|"]
    ratio = result["after_over_before"]
    for key, value in medians.items():
        model, path, tree = key.split(" | ")
        r = ratio.get(key.replace("| after", "| after/before"))
        lines.append(f"| {model} | {path} | {tree} | {value:.1f} | {' '.join(f'{x:.1f}' for x in rates[key])} | "
                     f"{f'{r:.2f}x' if r else ''} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
