"""CLI start-up and checkpoint verification times, each command in a fresh process.

Times (median of ``--repeats`` runs, wall clock) of ``factorlm --help``, ``factorlm compress
--help``, an argument error, ``import factorlm`` and ``factorlm inspect --verify`` on a
factored checkpoint with the published shapes of a large model (Llama-3-70B), whose shards are sparse
files (real headers, real sizes, no data: verification reads headers only). With
``--baseline-src`` the same commands also run against another source tree (e.g. a
checkout of an earlier version), interleaved run by run, so both see the same machine
load. Results go to benchmarks/results/cli_startup.{json,md}; the script ends with one
JSON line.

    python benchmarks/bench_cli_startup.py --repeats 5 --baseline-src ../old/src --baseline-label "before"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SRC = Path(__file__).resolve().parents[1] / "src"
# Llama-3-70B's published shapes; every block linear factored at rank 1024, 8 shards
LARGE = dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
             num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
             tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=500000.0, torch_dtype="bfloat16")
RANK, SHARDS = 1024, 8


def sparse_checkpoint(root: Path) -> Path:
    """A factored checkpoint of LARGE whose shards hold real headers and sparse (unallocated) data."""
    import struct

    h, m, n_kv, head = LARGE["hidden_size"], LARGE["intermediate_size"], LARGE["num_key_value_heads"], 128
    shapes = {"model.embed_tokens.weight": (LARGE["vocab_size"], h), "model.norm.weight": (h,),
              "lm_head.weight": (LARGE["vocab_size"], h)}
    ranks = {}
    linears = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (n_kv * head, h), "self_attn.v_proj": (n_kv * head, h),
               "self_attn.o_proj": (h, h), "mlp.gate_proj": (m, h), "mlp.up_proj": (m, h), "mlp.down_proj": (h, m)}
    for i in range(LARGE["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        for name, (out_f, in_f) in linears.items():
            ranks[f"{p}.{name}"] = RANK
            shapes[f"{p}.{name}.weight_u"] = (out_f, RANK)
            shapes[f"{p}.{name}.weight_v"] = (RANK, in_f)
    names = sorted(shapes)
    weight_map = {}
    for s in range(SHARDS):
        file = f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names[s::SHARDS]:
            numel = 1
            for d in shapes[name]:
                numel *= d
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + 2 * numel]}
            offset += 2 * numel
            weight_map[name] = file
        raw = json.dumps(header).encode()
        with open(root / file, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            fh.truncate(8 + len(raw) + offset)  # sparse: the data bytes are never written
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    block = {"quant_method": "factorlm", "format_version": 1, "ranks": ranks, "dense": [], "correctors": "folded",
             "factor_dtype": "bfloat16", "producer": {"name": "factorlm", "version": "bench"}}
    (root / "config.json").write_text(json.dumps({**LARGE, "architectures": ["LlamaForCausalLM"],
                                                  "quantization_config": block}))
    return root


def commands(checkpoint: Path) -> dict[str, list[str]]:
    py = [sys.executable]
    return {
        "python -c pass": py + ["-c", "pass"],
        "import factorlm": py + ["-c", "import factorlm"],
        "factorlm --help": py + ["-m", "factorlm", "--help"],
        "factorlm compress --help": py + ["-m", "factorlm", "compress", "--help"],
        "compress --batch-size 0 (error)": py + ["-m", "factorlm", "compress", "x", "-o", "y", "--batch-size", "0"],
        "inspect --verify (70B-shaped, 8 shards)": py + ["-m", "factorlm", "inspect", str(checkpoint), "--verify"],
    }


def time_once(argv: list[str], src: Path) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    return time.perf_counter() - started, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline-src", type=Path, default=None, help="another source tree to time the same commands on")
    ap.add_argument("--baseline-label", default="baseline")
    ap.add_argument("--tag", default="cli_startup")
    args = ap.parse_args()
    trees = {"this tree": SRC} | ({args.baseline_label: args.baseline_src.resolve()} if args.baseline_src else {})
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        cmds = commands(sparse_checkpoint(Path(tmp)))
        times = {label: {name: [] for name in cmds} for label in trees}
        codes = {label: {} for label in trees}
        for _ in range(args.repeats):
            for name, argv in cmds.items():
                for label, src in trees.items():  # interleaved: both trees see the same load
                    if label != "this tree" and name.startswith("inspect --verify"):
                        continue  # the flag is new
                    seconds, code = time_once(argv, src)
                    times[label][name].append(seconds)
                    codes[label][name] = code
    load_after = os.getloadavg()
    result = {
        "command": shlex.join(["python", "benchmarks/bench_cli_startup.py", "--repeats", str(args.repeats)]
                              + (["--baseline-src", "<earlier checkout>/src", "--baseline-label", args.baseline_label]
                                 if args.baseline_src else [])),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
        "repeats": args.repeats,
        "median_s": {label: {k: round(statistics.median(v), 3) for k, v in t.items() if v} for label, t in times.items()},
        "min_s": {label: {k: round(min(v), 3) for k, v in t.items() if v} for label, t in times.items()},
        "exit_codes": codes,
    }
    labels = list(trees)
    lines = [f"# CLI start-up ({args.repeats} runs each, median wall seconds, fresh process per run)", "",
             f"`{result['command']}`; load average {result['loadavg_before']} before, "
             f"{result['loadavg_after']} after.", "",
             "| command | " + " | ".join(labels) + (f" | {labels[1]} / {labels[0]} |" if len(labels) > 1 else " |"),
             "|---|" + "---:|" * (len(labels) + (1 if len(labels) > 1 else 0))]
    for name in cmds:
        med = [result["median_s"][lb].get(name) for lb in labels]
        cells = [f"{m:.2f}" if m is not None else "-" for m in med]
        if len(labels) > 1:
            cells.append(f"{med[1] / med[0]:.1f}x" if med[1] is not None else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.md").write_text(table)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
