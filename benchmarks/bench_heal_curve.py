"""Healing curve: held-out KL and WikiText-2 perplexity of one healing run against training tokens.

One ``factorlm finetune`` run (``--procs`` gloo processes, top-k teacher cache, optional bf16)
writes the model after log-spaced steps (``--snapshot-steps``); afterwards every snapshot, the
unhealed checkpoint (0 tokens) and the final model are scored on

* the held-out KL to the teacher (full vocabulary, fp32) on held-out windows of the training
  text (its last 10%, the windows ``factorlm finetune`` reports), and
* WikiText-2 perplexity (first ``--ppl-tokens`` tokens, windows of ``--ppl-window``, default 2048;
  evaluation only).

The learning-rate schedule is the full run's (warm-up, cosine to 10%), so a snapshot is the state
of that run, not the result of a shorter run. Writes results/heal_curve.md + .json + .png.

    python benchmarks/bench_heal_curve.py CKPT --calib TEXT --text wiki.test.raw --steps 256 \\
        --snapshot-steps 8 16 32 64 128 --procs 2 --batch-size 1 --seq-len 512 --bf16

``--train scales`` with a quantized checkpoint and the floating-point one it came from as
``--teacher`` gives the curve of scale-only training (results/<--name>.*).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def source_label(spec: str) -> str:
    """The training text by file or source name only (no folders): ``a.txt,sample,austen``."""
    from factorlm.compressor.calib_sources import MIX_SEPARATOR, mix_parts

    return MIX_SEPARATOR.join(part.split(":")[0] if part.startswith(("austen", "hf:")) else Path(part).name
                              for part in mix_parts(spec) or [spec])


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def train(a: argparse.Namespace, out: Path) -> dict:
    """The healing run itself (skipped when ``out`` already holds its result)."""
    report_file = out / "factorlm_finetune.json"
    if not report_file.is_file():
        args = [a.checkpoint, "--teacher", a.teacher, "-o", str(out), "--calib", a.calib, "--steps", str(a.steps),
                "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size), "--top-k", str(a.top_k),
                "--lr", str(a.lr), "--held-out", str(a.held_out), "--no-progress",
                "--snapshot-steps", *map(str, a.snapshot_steps), "--train", a.train]
        if a.bf16:
            args.append("--bf16")
        if a.teacher_cache:
            args += ["--teacher-cache", a.teacher_cache]
        cmd = ([str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", str(a.procs)] if a.procs > 1
               else [sys.executable]) + ["-m", "factorlm", "finetune", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env)
    return json.loads(report_file.read_text())


def score(point: tuple[int, str], a: argparse.Namespace) -> dict:
    """Held-out KL and WikiText-2 perplexity of one checkpoint (runs in a 1-thread worker)."""
    import torch

    from factorlm.compressor.calib_sources import source_ids
    from factorlm.compressor.correctors import kl_to_teacher
    from factorlm.compressor.finetune import FinetuneConfig, split_windows
    from factorlm.cli.common import resolve_model_path
    from factorlm.eval.perplexity import perplexity, read_text
    from factorlm.runtime.checkpoint import load_factored, load_model, load_tokenizer

    torch.set_num_threads(1)
    step, path = point
    t0 = time.perf_counter()
    student = load_factored(path, fast_layout=False).eval()
    teacher = load_model(resolve_model_path(a.teacher), fast_layout=False).eval()
    tok = load_tokenizer(path)
    # the same held-out windows the finetune run reports (seed and length of that run)
    cfg = FinetuneConfig(steps=1, samples=1, seq_len=a.seq_len, held_out=a.held_out)
    _, held = split_windows(source_ids(tok, a.calib), cfg, where=a.calib)
    with torch.no_grad():
        kl = sum(float(kl_to_teacher(student(input_ids=w).logits, teacher(input_ids=w).logits.float().log_softmax(-1)))
                 for w in held.split(1)) / held.shape[0]
        del teacher
        ppl = perplexity(student, tok, read_text(a.text), window=a.ppl_window, max_tokens=a.ppl_tokens, progress=False)
    return {"step": step, "held_out_kl": round(kl, 6), "wikitext2_ppl": round(ppl.ppl, 4),
            "ppl_tokens_scored": ppl.tokens_scored, "eval_s": round(time.perf_counter() - t0, 1)}


def plot(rows: list[dict], dense_ppl: float | None, path: Path, label: str = "dense", target: float = 1.5) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["tokens"] for r in rows]  # symlog: 0 tokens (the unhealed checkpoint) sits at the left edge
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(x, [r["held_out_kl"] for r in rows], "o-")
    ax1.set(xlabel="training tokens", ylabel="held-out KL to the teacher (nats/token)",
            title="held-out KL")
    ax2.plot(x, [r["wikitext2_ppl"] for r in rows], "o-", label="trained")
    if dense_ppl:
        ax2.axhline(dense_ppl, color="grey", ls="--", label=f"{label} {dense_ppl:.2f}")
        ax2.axhline(target * dense_ppl, color="grey", ls=":", label=f"{target:g}x {label} (target)")
    ax2.set(xlabel="training tokens", ylabel="WikiText-2 perplexity", title="WikiText-2 perplexity")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xscale("symlog", linthresh=max(min(v for v in x if v > 0), 1))
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def markdown(result: dict) -> str:
    """The heal_curve.md table (one row per scored point) with the run's settings and load."""
    dense = result.get("dense_ppl")
    fr = result["finetune_report"]
    label = result.get("reference_label", "dense")
    lines = [f"# {result.get('title', 'Healing curve (sample model, saes+mgaa keep 0.8, LAMBADA text)')}", "",
             f"One run of {result['steps']} steps x {result['tokens_per_step']:,} tokens ({result['procs']} gloo "
             f"process(es) x batch {result['batch_size']} x {result['seq_len']} tokens), top-{result['top_k']} teacher "
             f"cache, {'bf16 autocast' if result['bf16'] else 'fp32'}, peak lr {result['lr']:g} (10% warm-up, cosine "
             f"to 10%); {fr['tokens_per_s']:.0f} training tokens/s, {result['train_wall_s'] / 60:.1f} min wall for the "
             f"run (teacher cache {fr['seconds']['teacher_cache']:.0f} s, training {fr['seconds']['train']:.0f} s). "
             f"Load average {' '.join(result['loadavg']['start'])} at start, "
             f"{' '.join(result['loadavg']['after_training'])} after training, {' '.join(result['loadavg']['end'])} "
             "after scoring.", "",
             f"Held-out KL: full vocabulary, fp32, {result['held_out']} windows of {result['seq_len']} tokens from the "
             f"last 10% of the training text (never trained on). WikiText-2: first {result['ppl_tokens']:,} tokens of "
             f"wiki.test.raw, windows of {result.get('ppl_window', 2048)}, fp32 (evaluation only)" + (f"; {label} {dense:.2f} on the same tokens." if dense else "."),
             "", f"| step | training tokens | held-out KL | WikiText-2 ppl | ppl / {label} | ppl change since previous point |",
             "|---|---|---|---|---|---|"]
    prev = None
    for r in result["points"]:
        ratio = f"{r['wikitext2_ppl'] / dense:.2f}x" if dense else "-"
        change = "-" if prev is None else f"{(r['wikitext2_ppl'] / prev - 1) * 100:+.1f}%"
        lines.append(f"| {r['step']} | {r['tokens']:,} | {r['held_out_kl']:.4f} | {r['wikitext2_ppl']:.2f} | {ratio} | {change} |")
        prev = r["wikitext2_ppl"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--calib", required=True, help="training text (never WikiText-2)")
    ap.add_argument("--text", required=True, help="WikiText-2 test text, evaluation only")
    ap.add_argument("--teacher", default="sample")
    ap.add_argument("--out", required=True, help="folder of the healed model (snapshots beside it)")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--snapshot-steps", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1, help="windows per step per process")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--held-out", type=int, default=4)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--teacher-cache", default=None)
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--ppl-window", type=int, default=2048, help="WikiText-2 window (default 2048)")
    ap.add_argument("--dense-ppl", type=float, default=None,
                    help="the reference's perplexity on the same tokens (dense, or see --reference-label)")
    ap.add_argument("--reference-label", default="dense", help="what --dense-ppl is the perplexity of")
    ap.add_argument("--target-ratio", type=float, default=1.5, help="target line: this times the reference ppl")
    ap.add_argument("--train", choices=("all", "correctors", "scales"), default="all",
                    help="what the run trains (finetune --train); scales: a quantized checkpoint's scales")
    ap.add_argument("--name", default="heal_curve", help="results/<name>.{md,json,png}")
    ap.add_argument("--title", default="Healing curve (sample model, saes+mgaa keep 0.8, LAMBADA text)")
    ap.add_argument("--jobs", type=int, default=2, help="checkpoints scored side by side")
    ap.add_argument("--report-only", action="store_true", help="rewrite <name>.md/.png from <name>.json")
    a = ap.parse_args()
    if a.report_only:
        result = json.loads((RESULTS / f"{a.name}.json").read_text())
        (RESULTS / f"{a.name}.md").write_text(markdown(result))
        plot(result["points"], result.get("dense_ppl"), RESULTS / f"{a.name}.png",
             result.get("reference_label", "dense"), result.get("target_ratio", 1.5))
        return

    out = Path(a.out)
    load_start = loadavg()
    t0 = time.perf_counter()
    report = train(a, out)
    train_wall = time.perf_counter() - t0
    load_trained = loadavg()
    tokens_per_step = report["train_tokens_per_step"]
    snaps = out.with_name(out.name + ".snapshots")
    points = [(0, a.checkpoint)] + [(s, str(snaps / f"step-{s}")) for s in sorted(a.snapshot_steps)]
    points.append((a.steps, str(out)))
    with ProcessPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(score, points, [a] * len(points)))
    for r in rows:
        r["tokens"] = r["step"] * tokens_per_step
    load_end = loadavg()
    result = {"checkpoint": Path(a.checkpoint).name, "steps": a.steps, "procs": a.procs, "batch_size": a.batch_size,
              "seq_len": a.seq_len, "top_k": a.top_k, "lr": a.lr, "bf16": a.bf16, "held_out": a.held_out,
              "ppl_tokens": a.ppl_tokens, "ppl_window": a.ppl_window,
              "calib": source_label(a.calib), "tokens_per_step": tokens_per_step, "train_wall_s": round(train_wall, 1),
              "finetune_report": {k: report[k] for k in ("tokens_per_s", "seconds", "held_out_kl_before",
                                                           "held_out_kl_after", "world_size", "loss")},
              "dense_ppl": a.dense_ppl, "reference_label": a.reference_label, "target_ratio": a.target_ratio,
              "train": a.train, "title": a.title, "teacher": Path(a.teacher).name, "loadavg": {"start": load_start, "after_training": load_trained,
                                                     "end": load_end}, "points": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{a.name}.json").write_text(json.dumps(result, indent=2))
    plot(rows, a.dense_ppl, RESULTS / f"{a.name}.png", a.reference_label, a.target_ratio)
    (RESULTS / f"{a.name}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"training wall {train_wall:.0f} s, {report['tokens_per_s']:.0f} tokens/s; load {load_start} -> "
          f"{load_trained} -> {load_end}; log2 steps {[round(math.log2(max(r['step'], 1)), 1) for r in rows]}")


if __name__ == "__main__":
    main()
