"""Healing throughput: the old finetune (1 window per step, teacher on the fly, fp32, 1 process)
against batching, the top-k teacher cache, bf16 autocast, longer windows and the second core.

Each configuration is a real ``factorlm finetune`` run on a factored checkpoint of the sample
model over the same number of training tokens (``--tokens``; steps = tokens / tokens per step);
tokens/s counts training tokens over training time including the teacher (its forwards, or
building its top-k cache). Writes results/heal.md + .json + heal.png.

    python benchmarks/bench_heal.py CKPT --calib TEXT [--tokens 4096]

With ``--lr LR [LR ...]`` it instead compares peak learning rates on one configuration (batch 2,
top-k cache with the tail bucket, 1 process each; ``--jobs`` runs them side by side, so their
tokens/s are not throughput numbers) and appends a section to results/heal.md (+ heal_lr_<steps>steps.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

CONFIGS = {
    "old: 1 x 256, teacher on the fly, fp32, 1 process": dict(procs=1, batch=1, seq_len=256, top_k=None, threads=1),
    "4 x 256, top-64 cache, fp32, 1 process": dict(procs=1, batch=4, seq_len=256, top_k=64, threads=1),
    "4 x 256, top-64 cache, bf16, 1 process": dict(procs=1, batch=4, seq_len=256, top_k=64, threads=1, bf16=True),
    "2 x 512, top-64 cache, bf16, 1 process": dict(procs=1, batch=2, seq_len=512, top_k=64, threads=1, bf16=True),
    "2 x 512, top-64 cache, bf16, 1 process x 2 threads": dict(procs=1, batch=2, seq_len=512, top_k=64, threads=2,
                                                                bf16=True),
    "1 x 512 x 2 gloo processes, top-64 cache, bf16": dict(procs=2, batch=1, seq_len=512, top_k=64, threads=1,
                                                           bf16=True),
}


def run_one(ckpt: str, calib: str, steps: int, seq_len: int, cfg: dict, work: Path) -> dict:
    out = work / cfg.get("name", f"out{len(list(work.iterdir()))}")
    args = [ckpt, "--teacher", "sample", "-o", str(out), "--calib", calib, "--steps", str(steps),
            "--seq-len", str(seq_len), "--held-out", str(cfg.get("held_out", 1)), "--batch-size", str(cfg["batch"]),
            "--no-progress"]
    if cfg.get("lr"):
        args += ["--lr", str(cfg["lr"])]
    if cfg["top_k"]:
        args += ["--top-k", str(cfg["top_k"])]
    if cfg.get("bf16"):
        args.append("--bf16")
    if cfg["procs"] > 1:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", str(cfg["procs"]),
               "-m", "factorlm", "finetune", *args]
    else:
        cmd = [sys.executable, "-m", "factorlm", "finetune", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"])}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    report = json.loads((out / "factorlm_finetune.json").read_text())
    return {"tokens_per_s": report["tokens_per_s"], "train_tokens": report["train_tokens"],
            "seconds": report["seconds"], "world_size": report["world_size"], "wall_s": round(time.perf_counter() - t0, 1),
            "held_out_kl_before": report["held_out_kl_before"], "held_out_kl_after": report["held_out_kl_after"],
            "loss": report["loss"], "trained_params": report["trained_params"]}


def lr_sweep(a: argparse.Namespace) -> None:
    """Held-out KL before/after for each peak learning rate, same data and budget; appends to heal.md."""
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    cfgs = {lr: dict(procs=1, batch=a.batch_size, top_k=a.top_k, threads=1, lr=lr, held_out=a.held_out,
                     name=f"lr{lr:g}") for lr in a.lr}
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(a.jobs) as pool:
        futures = {lr: pool.submit(run_one, a.checkpoint, a.calib, a.steps, a.seq_len, cfg, Path(tmp))
                   for lr, cfg in cfgs.items()}
        rows = {lr: {**cfgs[lr], **f.result()} for lr, f in futures.items()}
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"heal_lr_{a.steps}steps.json").write_text(json.dumps({"steps": a.steps, "seq_len": a.seq_len, "batch": a.batch_size,
                                                      "top_k": a.top_k, "held_out": a.held_out, "jobs": a.jobs,
                                                      "loadavg_before": load_before, "loadavg_after": load_after,
                                                      "runs": {f"{lr:g}": r for lr, r in rows.items()}}, indent=2))
    lines = ["", f"## Peak learning rate ({a.steps} steps x batch {a.batch_size} x {a.seq_len} tokens, top-{a.top_k} "
             f"cache with tail bucket, 1 thread per run)", "",
             f"{a.jobs} run(s) side by side; load average {' '.join(load_before)} before, {' '.join(load_after)} after. "
             f"Held-out KL (full vocabulary) on {a.held_out} held-out windows.", "",
             "| peak lr | held-out KL before | after | change | first / last training loss |", "|---|---|---|---|---|"]
    for lr, r in rows.items():
        b, e = r["held_out_kl_before"], r["held_out_kl_after"]
        lines.append(f"| {lr:g} | {b:.4f} | {e:.4f} | {e - b:+.4f} | {r['loss'][0]:.4f} / {r['loss'][-1]:.4f} |")
    with open(RESULTS / "heal.md", "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--steps", type=int, default=4, help="steps of the --lr comparison")
    ap.add_argument("--seq-len", type=int, default=256, help="window length of the --lr comparison")
    ap.add_argument("--tokens", type=int, default=4096, help="training tokens of every throughput configuration")
    ap.add_argument("--lr", type=float, nargs="+", default=None, help="compare these peak learning rates instead")
    ap.add_argument("--batch-size", type=int, default=2, help="windows per step in the --lr comparison")
    ap.add_argument("--top-k", type=int, default=64, help="teacher cache size in the --lr comparison")
    ap.add_argument("--held-out", type=int, default=4, help="held-out windows in the --lr comparison")
    ap.add_argument("--jobs", type=int, default=1, help="--lr runs side by side")
    a = ap.parse_args()
    if a.lr:
        lr_sweep(a)
        return
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in CONFIGS.items():
            steps = a.tokens // (cfg["batch"] * cfg["procs"] * cfg["seq_len"])
            load = Path("/proc/loadavg").read_text().split()[0]
            rows[name] = {**cfg, "steps": steps, "loadavg_1min_at_start": load,
                          **run_one(a.checkpoint, a.calib, steps, cfg["seq_len"], cfg, Path(tmp))}
            print(name, rows[name]["tokens_per_s"], flush=True)
    base = rows[next(iter(rows))]["tokens_per_s"]
    result = {"tokens": a.tokens, "loadavg_before": load_before,
              "loadavg_after": Path("/proc/loadavg").read_text().split()[:3], "runs": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "heal.json").write_text(json.dumps(result, indent=2))
    lines = ["# Healing throughput (sample model, saes+mgaa keep 0.8, LAMBADA text)", "",
             f"{a.tokens} training tokens per configuration, one run each, in table order; load average "
             f"{' '.join(load_before)} before, {' '.join(result['loadavg_after'])} after.", "",
             "| configuration | steps | training tokens | load (1 min) at start | tokens/s | vs old | first / last loss "
             "| held-out KL before -> after |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['steps']} | {r['train_tokens']} | {r['loadavg_1min_at_start']} | "
                     f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}x | {r['loss'][0]:.4f} / "
                     f"{r['loss'][-1]:.4f} | {r['held_out_kl_before']:.4f} -> {r['held_out_kl_after']:.4f} |")
    (RESULTS / "heal.md").write_text("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(list(rows), [r["tokens_per_s"] for r in rows.values()])
    ax.set(xlabel="training tokens/s (incl. teacher)", title="factorlm finetune throughput, 2-core CPU")
    fig.tight_layout()
    fig.savefig(RESULTS / "heal.png", dpi=100)


if __name__ == "__main__":
    main()
