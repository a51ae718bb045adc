"""Methods and rank allocators on the sample model: WikiText-2 perplexity, compress time, allocation time.

For every (method, allocation, keep) configuration the sample model is compressed with
``factorlm compress`` in its own process (peak RSS and wall time measured per process), then
scored with ``factorlm eval ppl`` on the first ``--ppl-tokens`` tokens of the WikiText-2 raw test
file (non-overlapping 2048-token windows). Calibration is the built-in ``sample`` text (BoolQ
passages, disjoint from WikiText-2). Results are appended to the JSON after every run, so an
interrupted grid resumes with ``--resume``; the Markdown table is rewritten each time.
Configuration names follow bench_quality's allocation grid (``<method>-<allocation>-k<keep>``).

    python benchmarks/bench_allocation.py --wikitext WIKI --keeps 0.9 0.8 \\
        --runs saes-uniform svd-llm-uniform saes-energy saes-greedy saes-mgaa saes-ara --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
DEFAULT_RUNS = ["saes-uniform", "svd-llm-uniform", "saes-energy", "saes-greedy", "saes-mgaa", "saes-ara"]


def cli() -> list[str]:
    return [sys.executable, "-m", "factorlm.cli"]


def run_measured(cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, float, int]:
    """Run ``cmd``; returns (exit code, wall seconds, peak RSS MiB of that process)."""
    started = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - started, int(usage.ru_maxrss / 1024)


def ppl(folder: str, wiki: str, tokens: int, env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([*cli(), "eval", "ppl", folder, "--text", wiki, "--max-tokens", str(tokens), "--json",
                          "--no-progress"], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"eval ppl {folder} failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def one_run(name: str, method: str, allocation: str, keep: float, args: argparse.Namespace,
            env: dict[str, str], workdir: Path) -> dict[str, Any]:
    folder = workdir / name
    cmd = [*cli(), "compress", "sample", "-o", str(folder), "--method", method, "--allocation", allocation,
           "--keep", str(keep), "--calib", args.calib, "--calib-samples", str(args.calib_samples),
           "--calib-len", str(args.calib_len), "--seed", str(args.seed), "--overwrite", "--no-progress"]
    rc, wall, rss = run_measured(cmd, env, workdir / f"{name}.log")
    row: dict[str, Any] = {"name": name, "method": method, "allocation": allocation, "keep_linear": keep,
                           "command": "factorlm " + " ".join(cmd[3:]).replace(str(workdir) + "/", "OUT/")}
    if rc != 0:
        row["error"] = (workdir / f"{name}.log").read_text()[-800:]
        return row
    totals = json.loads((folder / "factorlm_report.json").read_text())["totals"]
    score = ppl(str(folder), args.wikitext, args.ppl_tokens, env)
    row.update(linear_kept_actual=round(totals["linear_keep"], 4), model_kept=round(totals["model_keep"], 4),
               dense_modules=totals["dense_modules"], wikitext2_ppl=round(score["ppl"], 3),
               tokens_scored=score.get("tokens_scored"), compress_wall_s=round(wall, 1), compress_peak_rss_mib=rss,
               spectra_time_s=totals.get("spectra_time_s"), allocation_time_s=totals.get("allocation_time_s"),
               factorize_time_s=totals.get("factorize_time_s"),
               mean_rel_output_error=totals.get("mean_rel_output_error"))
    if "ara" in totals:
        row["ara"] = totals["ara"]
    return row


def write_json_atomic(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)


def write_markdown(path: Path, data: dict[str, Any]) -> None:
    s = data["setup"]
    lines = [f"# {s['title']}", ""] + [f"- {k}: {v}" for k, v in s.items() if k != "title"] + [""]
    lines += ["| config | method | allocation | keep (linear) | kept actual | dense modules | WikiText-2 ppl | "
              "compress wall s | spectra s | allocation s | peak RSS MiB |", "|" + "---|" * 11]
    if data.get("dense"):
        lines.append(f"| dense | - | - | 1.0 | 1.0 | - | {data['dense']['wikitext2_ppl']:.3f} | - | - | - | - |")
    order = {n: i for i, n in enumerate(DEFAULT_RUNS)}
    rows = sorted(data["rows"], key=lambda r: (-r["keep_linear"], order.get(f"{r['method']}-{r['allocation']}", 99)))
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['method']} | {r['allocation']} | {r['keep_linear']} | failed | | | | | | |")
            continue
        lines.append(f"| {r['name']} | {r['method']} | {r['allocation']} | {r['keep_linear']} | "
                     f"{r['linear_kept_actual']:.4f} | {r['dense_modules']} | {r['wikitext2_ppl']:.3f} | "
                     f"{r['compress_wall_s']:.0f} | {r['spectra_time_s']} | {r['allocation_time_s']} | "
                     f"{r['compress_peak_rss_mib']} |")
    lines += ["", "Commands (OUT = a scratch folder, WIKI = wiki.test.raw):", ""]
    lines += [f"    {r['command']}" for r in rows]
    lines += [f"    factorlm eval ppl OUT/NAME --text WIKI --max-tokens {s['ppl_tokens']} --json", ""]
    path.write_text("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wikitext", required=True, help="WikiText-2 raw test file")
    p.add_argument("--keeps", type=float, nargs="+", default=[0.9, 0.8])
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="METHOD-ALLOCATION pairs")
    p.add_argument("--calib", default="sample")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ppl-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--jobs", type=int, default=1, help="configurations run at the same time")
    p.add_argument("--workdir", default=None, help="where the compressed folders go (default: a temp dir)")
    p.add_argument("--name", default="quality_allocation")
    p.add_argument("--dense-ppl", type=float, default=None, help="reuse a dense perplexity measured with the same settings")
    p.add_argument("--resume", action="store_true", help="skip configurations already in the results JSON")
    p.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                   help="only merge the rows of other result files of this script into --name and rewrite it")
    args = p.parse_args()
    RESULTS.mkdir(exist_ok=True)
    out_json = RESULTS / f"{args.name}.json"
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_allocation-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    data: dict[str, Any] = {"setup": {
        "title": "Methods and rank allocation on the sample model",
        "model": "SmolLM2-135M-Instruct fp32 (factorlm sample-model)",
        "calibration": f"{args.calib_samples} x {args.calib_len} tokens, seed {args.seed}, --calib {args.calib} "
                       "(BoolQ passages, not WikiText-2)",
        "eval": "WikiText-2 raw test, non-overlapping 2048-token windows",
        "ppl_tokens": args.ppl_tokens,
        "cpu": f"{os.cpu_count()} shared cores, {args.threads} torch thread(s) per process, {args.jobs} job(s) at once; "
               "timings are noisy (other work shared the machine)",
        "python": platform.python_version(),
    }, "dense": None, "rows": []}
    if args.merge:
        data = json.loads(out_json.read_text())
        names = {r["name"] for r in data["rows"]}
        for other in args.merge:
            rows = json.loads(Path(other).read_text())["rows"]
            data["rows"] += [r for r in rows if r["name"] not in names and "error" not in r]
        write_json_atomic(out_json, data)
        write_markdown(RESULTS / f"{args.name}.md", data)
        return 0
    if args.resume and out_json.is_file():
        old = json.loads(out_json.read_text())
        data["rows"], data["dense"] = old.get("rows", []), old.get("dense")
    done = {r["name"] for r in data["rows"] if "error" not in r}
    data["rows"] = [r for r in data["rows"] if r["name"] in done]
    if data["dense"] is None and args.dense_ppl is not None:
        data["dense"] = {"wikitext2_ppl": args.dense_ppl}
    if data["dense"] is None:
        data["dense"] = {"wikitext2_ppl": round(ppl("sample", args.wikitext, args.ppl_tokens, env)["ppl"], 3)}
    todo = []
    for keep in args.keeps:
        for run in args.runs:
            method, _, allocation = run.rpartition("-")
            name = f"{method}-{allocation}-k{keep}"
            if name not in done:
                todo.append((name, method, allocation, keep))

    def work(item: tuple[str, str, str, float]) -> None:
        row = one_run(*item, args=args, env=env, workdir=workdir)
        data["rows"].append(row)
        write_json_atomic(out_json, data)
        write_markdown(RESULTS / f"{args.name}.md", data)
        print(json.dumps(row), flush=True)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(work, todo))
    write_json_atomic(out_json, data)
    write_markdown(RESULTS / f"{args.name}.md", data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
