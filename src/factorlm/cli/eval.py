"""``factorlm eval ppl|zeroshot|lm-eval DIR``: perplexity and zero-shot accuracy of a dense or factored model.

``zeroshot`` scores with factorlm's own implementation of lm-eval's definitions; ``lm-eval`` runs
lm-evaluation-harness itself (the ``eval`` extra) on the same local rows.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from .common import check_context, check_output, int_at_least, positive_int


DTYPES = {"auto", "float32", "bfloat16", "float16"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate model quality")
    sub = p.add_subparsers(dest="eval_command", required=True)
    ppl = sub.add_parser("ppl", help="perplexity over non-overlapping windows of a text file")
    ppl.add_argument("model", help="dense or factored model folder, or 'sample'")
    ppl.add_argument("--text", required=True, help="UTF-8 text file (e.g. the WikiText-2 raw test file)")
    ppl.add_argument("--window", type=int_at_least(2), default=2048, help="window length in tokens (default 2048)")
    ppl.add_argument("--max-tokens", type=int_at_least(2), default=None, help="score only the first N tokens")
    ppl.add_argument("--json", action="store_true", help="print the result as JSON")
    ppl.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ppl.set_defaults(func=run_ppl)
    zs = sub.add_parser("zeroshot", help="zero-shot multiple-choice accuracy (lm-eval's acc / acc_norm)")
    zs.add_argument("model", help="dense or factored model folder, or 'sample'")
    zs.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq",
                    help="comma-separated tasks: piqa, arc_easy, arc_challenge, hellaswag, winogrande, boolq, "
                         "lambada, mmlu (default: the first six)")
    zs.add_argument("--limit", type=positive_int, default=None,
                    help="score a seeded subset of N rows per task (default: all)")
    zs.add_argument("--seed", type=int, default=1234, help="subset seed; the same seed gives every model the same rows")
    zs.add_argument("--batch-size", type=positive_int, default=8, help="requests per forward pass (default 8)")
    zs.add_argument("--threads", type=positive_int, default=None,
                    help="torch CPU threads (default: torch's choice; 1 is often faster on a busy machine)")
    zs.add_argument("--output", default=None, help="write the JSON report to this file")
    zs.add_argument("--json", action="store_true", help="print the JSON report instead of a table")
    zs.add_argument("--no-progress", action="store_true", help="hide progress bars")
    zs.set_defaults(func=run_zeroshot)
    le = sub.add_parser("lm-eval", help="zero-shot accuracy computed by lm-evaluation-harness itself, offline")
    le.add_argument("model", help="dense or factored model folder, or 'sample'")
    le.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq",
                    help="comma-separated lm-eval tasks with local data: piqa, arc_easy, arc_challenge, hellaswag, "
                         "winogrande, boolq (default: all six)")
    le.add_argument("--limit", type=positive_int, default=None,
                    help="score the same seeded subset of N rows per task as 'eval zeroshot --limit N' (default: all)")
    le.add_argument("--seed", type=int, default=1234, help="subset seed (same meaning as for 'eval zeroshot')")
    le.add_argument("--batch-size", type=positive_int, default=8, help="lm-eval batch size (default 8)")
    le.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    le.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                    help="weights and activations (default auto: as 'eval zeroshot' loads the model, "
                         "float32 for a dense folder, the stored dtype for a factored one)")
    le.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    le.add_argument("--output", default=None, help="write the JSON report to this file")
    le.add_argument("--json", action="store_true", help="print the JSON report instead of a table")
    le.add_argument("--no-progress", action="store_true", help="hide progress bars and lm-eval's info logging")
    le.set_defaults(func=run_lm_eval)


def run_ppl(args: argparse.Namespace) -> int:
    from ..eval.perplexity import perplexity, read_text
    from ..runtime.checkpoint import load_model, load_tokenizer
    from .common import resolve_model_path

    path = resolve_model_path(args.model)
    check_context(path, args.window, "--window")
    model = load_model(path).eval()
    result = perplexity(model, load_tokenizer(path), read_text(args.text), window=args.window,
                        max_tokens=args.max_tokens, progress=not args.no_progress)
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(f"perplexity {result.ppl:.4f} over {result.tokens_scored} tokens in {result.windows} window(s)")
    return 0


def run_zeroshot(args: argparse.Namespace) -> int:
    if args.output:
        check_output(args.output, kind="file")
    from ..eval.zeroshot import evaluate_zeroshot
    from ..runtime.checkpoint import load_model, load_tokenizer
    from .common import resolve_model_path

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    path = resolve_model_path(args.model)
    model = load_model(path).eval()
    report = evaluate_zeroshot(model, load_tokenizer(path), tasks, limit=args.limit, seed=args.seed,
                               batch_size=args.batch_size, progress=not args.no_progress)
    report["model"] = str(path)
    return _emit(report, args)


def _emit(report: dict, args: argparse.Namespace) -> int:
    """Write the report (--output), then print it as JSON (--json) or as a table."""
    from ..eval.zeroshot import write_json_atomic

    if args.output:
        write_json_atomic(args.output, report)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{'task':<14} {'n':>6} {'acc':>8} {'stderr':>8} {'acc_norm':>9} {'stderr':>8}")
    for name, r in report["tasks"].items():
        norm = (f"{r['acc_norm']:9.4f} {r['acc_norm_stderr'] or 0:8.4f}" if r["acc_norm"] is not None
                else f"{'-':>9} {'-':>8}")
        print(f"{name:<14} {r['n']:>6} {r['acc']:8.4f} {r['acc_stderr'] or 0:8.4f} {norm}")
    print(f"average acc {report['average']:.4f}  (acc_norm where defined: {report['average_norm']:.4f})"
          + (f"  [{report['evaluator']}]" if "evaluator" in report else ""))
    return 0


def run_lm_eval(args: argparse.Namespace) -> int:
    import logging

    from ..eval.lm_eval_harness import check_tasks, evaluate_lm_eval, require_lm_eval, set_offline
    from ..eval.tasks import get_task
    from ..runtime.checkpoint import load_model, load_tokenizer
    from .common import resolve_model_path

    tasks = check_tasks([t.strip() for t in args.tasks.split(",") if t.strip()])
    if args.output:
        check_output(args.output, kind="file")
    device = _resolve_device(args.device)
    set_offline()
    require_lm_eval()
    for name in tasks:  # the data files exist and read, before the model is loaded
        get_task(name).load()
    if args.no_progress:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model = load_model(path, dtype=dtype, device=device).eval()
    report = evaluate_lm_eval(model, load_tokenizer(path), tasks, limit=args.limit, seed=args.seed,
                              batch_size=args.batch_size, progress=not args.no_progress)
    report["model"] = str(path)
    report["device"], report["dtype"] = device, args.dtype
    return _emit(report, args)


def _resolve_device(value: str) -> str:
    """``auto`` -> cuda when available, else cpu; anything else is checked like every ``--device``."""
    import torch

    from ..runtime.format import FactorlmError
    from .common import device_type

    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return device_type(("cpu", "cuda"))(value)
    except argparse.ArgumentTypeError as exc:
        raise FactorlmError(f"--device: {exc}") from None
