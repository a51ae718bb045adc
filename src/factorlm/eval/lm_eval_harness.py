"""Run lm-evaluation-harness on a loaded dense or factored model, offline, on the local task data.

lm-eval (0.4.x, the ``eval`` extra) is the evaluator most users trust, so ``factorlm eval
lm-eval`` hands the model to it and lets its own code format the prompts and score the
log-likelihoods: the model goes in as an ``HFLM`` built from the already-loaded module (a
factored checkpoint loads like any HF model after ``import factorlm``), and the tasks are
lm-eval's standard configs pointed at local files (:mod:`factorlm.eval.lm_eval_tasks`).

Offline by construction: the Hub and ``datasets`` are switched to offline mode before lm-eval
is imported, and the task configs read no dataset from the Hub.

``--limit N`` scores the same seeded subset of rows as ``factorlm eval zeroshot --limit N``
(passed to lm-eval as its ``samples`` index lists), so the two reports are comparable row for
row. lm-eval's own ``--limit N`` takes the first N rows instead.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from ..runtime.format import FactorlmError
from .lm_eval_tasks import TASK_NAMES, TASKS_DIR
from .tasks import get_task
from .zeroshot import DEFAULT_SEED, select_indices

logger = logging.getLogger(__name__)

LM_EVAL_HINT = "pip install 'factorlm[eval]' (lm_eval 0.4.x)"
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def set_offline() -> None:
    """Switch the Hub client and ``datasets`` to offline mode (also when already imported)."""
    for name in OFFLINE_ENV:
        os.environ[name] = "1"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets

        datasets.config.HF_HUB_OFFLINE = True
        datasets.config.HF_DATASETS_OFFLINE = True


def require_lm_eval() -> Any:
    """The ``lm_eval`` module (0.4.x), or a clear error saying how to install it."""
    try:
        import lm_eval
    except ImportError as exc:
        raise FactorlmError(f"lm-evaluation-harness is not installed ({LM_EVAL_HINT}): {exc}") from exc
    version = getattr(lm_eval, "__version__", "")
    if not version.startswith("0.4."):
        raise FactorlmError(f"lm_eval {version or '(unknown version)'} found; factorlm's task configs "
                            f"target 0.4.x ({LM_EVAL_HINT})")
    return lm_eval


def check_tasks(tasks: Sequence[str]) -> list[str]:
    """The task list, or a clear error naming an unknown task (before any model is loaded)."""
    tasks = list(tasks)
    if not tasks:
        raise FactorlmError("no task given; choose from " + ", ".join(TASK_NAMES))
    for name in tasks:
        if name not in TASK_NAMES:
            raise FactorlmError(f"unknown lm-eval task {name!r}; the local configs cover {', '.join(TASK_NAMES)}")
    return tasks


def task_manager() -> Any:
    """An lm-eval ``TaskManager`` over factorlm's task configs only (indexing lm-eval's
    thousands of built-in configs would take seconds and they need the Hub anyway)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def make_lm(model: Any, tokenizer: Any, *, batch_size: int = 8, max_length: int | None = None) -> Any:
    """lm-eval's ``HFLM`` around an already-loaded model (dense or factored) and its tokenizer."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def subset_samples(tasks: Sequence[str], limit: int | None, seed: int = DEFAULT_SEED) -> dict[str, list[int]] | None:
    """lm-eval ``samples``: per task the row indices ``factorlm eval zeroshot`` scores; None = all rows."""
    if limit is None:
        return None
    return {name: select_indices(len(get_task(name).load()), limit, seed) for name in tasks}


def run_lm_eval(model: Any, tokenizer: Any, tasks: Sequence[str], *, limit: int | None = None,
                seed: int = DEFAULT_SEED, batch_size: int = 8, log_samples: bool = False,
                progress: bool = True) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on the local task configs; returns its results dict as is."""
    tasks = check_tasks(tasks)
    set_offline()
    lm_eval = require_lm_eval()
    if not progress:
        import datasets

        datasets.disable_progress_bars()
    lm = make_lm(model, tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager(),
                                      samples=subset_samples(tasks, limit, seed), log_samples=log_samples)
    if results is None:  # only non-zero ranks of a distributed run get None
        raise FactorlmError("lm-eval returned no results (not the main process?)")
    return results


def task_report(name: str, scores: dict[str, Any]) -> dict[str, Any]:
    """One task's entry, with the same keys as ``factorlm eval zeroshot`` writes."""
    def metric(key: str) -> float | None:
        value = scores.get(f"{key},none")
        return float(value) if isinstance(value, (int, float)) else None

    n = scores.get("sample_len")
    return {"task": name, "n": int(n) if n is not None else None, "n_total": len(get_task(name).load()),
            "acc": metric("acc"), "acc_stderr": metric("acc_stderr"), "acc_norm": metric("acc_norm"),
            "acc_norm_stderr": metric("acc_norm_stderr"), "source": get_task(name).source}


def lm_eval_report(results: dict[str, Any], tasks: Sequence[str], *, limit: int | None, seed: int,
                   seconds: float) -> dict[str, Any]:
    """The JSON report of an lm-eval run, shaped like ``factorlm eval zeroshot``'s."""
    import lm_eval

    per_task = {name: task_report(name, results["results"][name]) for name in tasks}
    accs = [r["acc"] for r in per_task.values()]
    norms = [r["acc_norm"] if r["acc_norm"] is not None else r["acc"] for r in per_task.values()]
    return {"tasks": per_task, "average": sum(accs) / len(accs), "average_norm": sum(norms) / len(norms),
            "limit": limit, "seed": seed, "num_fewshot": 0, "seconds": round(seconds, 2),
            "evaluator": f"lm_eval {lm_eval.__version__}",
            "lm_eval": {"versions": results.get("versions"), "n-samples": results.get("n-samples"),
                        "results": {name: results["results"][name] for name in tasks}}}


def evaluate_lm_eval(model: Any, tokenizer: Any, tasks: Sequence[str], *, limit: int | None = None,
                     seed: int = DEFAULT_SEED, batch_size: int = 8, progress: bool = True) -> dict[str, Any]:
    """Score ``tasks`` with lm-eval and return the JSON-ready report."""
    started = time.perf_counter()
    results = run_lm_eval(model, tokenizer, tasks, limit=limit, seed=seed, batch_size=batch_size, progress=progress)
    return lm_eval_report(results, list(tasks), limit=limit, seed=seed, seconds=time.perf_counter() - started)
