"""Zero-shot log-likelihood scoring with lm-evaluation-harness's definitions of acc and acc_norm.

For every (context, continuation) request the model scores the summed log-probability of the
continuation tokens given the context, exactly as lm-eval's ``HFLM.loglikelihood`` does:

* tokenization (``_encode_pair``): trailing spaces of the context move to the continuation; the
  continuation tokens are those of ``encode(context + continuation)`` after the tokens of
  ``encode(context)``; ``encode`` adds the special tokens the tokenizer adds by default (a BOS
  for Llama-3 or Gemma tokenizers, nothing for SmolLM2's), unless the text already starts
  with the BOS string, as lm-eval 0.4.13's ``HFLM.tok_encode`` does;
* the model input is ``(context + continuation)[-(max_length + 1):][:-1]``;
* ``is_greedy``: every continuation token is the argmax of its position's logits.

Per document (lm-eval ``ConfigurableTask.process_results``): acc = [argmax_i ll_i == gold];
acc_norm = [argmax_i ll_i / len(choice_i) == gold] with the choice length in characters;
greedy tasks (LAMBADA) count acc = is_greedy. The stderr of a mean is the sample standard
deviation (n - 1) over sqrt(n), as lm-eval's ``mean_stderr``.

This module does not import lm-evaluation-harness; ``factorlm eval lm-eval``
(:mod:`factorlm.eval.lm_eval_harness`) runs the harness itself on the same rows, and the tests
check that both give the same log-likelihoods, acc and acc_norm.

Orchestration (task selection, the seeded subset, the JSON report) is at the bottom; the math
above it is in small functions of tensors and lists.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..runtime.format import FactorlmError
from .tasks import Doc, get_task

logger = logging.getLogger(__name__)

DEFAULT_SEED = 1234


# --- tokenization and scoring ---------------------------------------------------------------

def encode(tokenizer: Any, text: str) -> list[int]:
    """lm-eval's ``HFLM.tok_encode``: the tokenizer's default special tokens (a BOS where the
    tokenizer adds one), none when ``text`` already starts with the BOS (or, lacking one, EOS)
    string."""
    prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prefix = tokenizer.decode(prefix_id) if prefix_id is not None else None
    kwargs = {"add_special_tokens": False} if prefix and text.startswith(prefix) else {}
    return list(tokenizer(text, **kwargs)["input_ids"])


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair``: (context tokens, continuation tokens); a BOS, where the
    tokenizer adds one, belongs to the context."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    if not ctx:
        raise FactorlmError("empty context: zero-shot requests need a non-empty context")
    return list(ctx), list(whole[len(ctx):])


def continuation_scores(logits: torch.Tensor, cont: torch.Tensor) -> tuple[float, bool]:
    """Summed log-probability of ``cont`` under ``logits`` (one row per continuation token) and
    whether every token is the greedy choice."""
    logp = F.log_softmax(logits.float(), dim=-1)
    ll = logp.gather(1, cont[:, None]).sum()
    return float(ll), bool((logp.argmax(-1) == cont).all())


@torch.no_grad()
def score_requests(model: Any, tokenizer: Any, requests: list[tuple[str, str]], *, batch_size: int = 8,
                   max_length: int = 2048, progress: bool = True, desc: str = "zero-shot") -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each (context, continuation) request.

    Requests with the same model input share one forward row (as lm-eval does for one-token
    continuations such as BoolQ's " no"/" yes" or MMLU's letters). Inputs are sorted longest
    first and right-padded into batches (right padding cannot change a causal model's scores at
    real positions); results come back in the input order.
    """
    device = next(model.parameters()).device
    encoded = []
    for ctx, cont in requests:
        c_ids, k_ids = encode_pair(tokenizer, ctx, cont)
        if not k_ids:
            raise FactorlmError(f"continuation {cont!r} encodes to no tokens")
        full = (c_ids + k_ids)[-(max_length + 1):]
        encoded.append((tuple(full[:-1]), len(k_ids), full[-len(k_ids):]))
    users: dict[tuple[int, ...], list[int]] = {}
    for i, (inp_ids, _, _) in enumerate(encoded):
        users.setdefault(inp_ids, []).append(i)
    inputs = sorted(users, key=len, reverse=True)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(encoded)
    bar = tqdm(total=len(encoded), desc=desc, unit="req", disable=not progress)
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        width = len(chunk[0])
        inp = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, ids in enumerate(chunk):
            inp[row, :len(ids)] = torch.tensor(ids)
            mask[row, :len(ids)] = 1
        logits = model(input_ids=inp.to(device), attention_mask=mask.to(device)).logits
        for row, ids in enumerate(chunk):
            for i in users[ids]:
                _, n_cont, cont = encoded[i]
                rows = logits[row, len(ids) - n_cont:len(ids)]
                if not torch.isfinite(rows).all():
                    raise FactorlmError(f"non-finite logits while scoring request {i}")
                results[i] = continuation_scores(rows, torch.tensor(cont, device=rows.device))
            bar.update(len(users[ids]))
    bar.close()
    return results


# --- per-document metrics --------------------------------------------------------------------

def doc_metrics(doc: Doc, scores: list[tuple[float, bool]], kind: str = "multiple_choice") -> dict[str, float]:
    """acc (and acc_norm where the task defines it) of one document from its choices' scores."""
    lls = [s[0] for s in scores]
    if kind == "greedy":
        return {"acc": float(scores[0][1])}
    out = {"acc": float(max(range(len(lls)), key=lambda i: (lls[i], -i)) == doc.gold)}
    if doc.norm_lens is not None:
        normed = [ll / float(n) for ll, n in zip(lls, doc.norm_lens)]
        out["acc_norm"] = float(max(range(len(normed)), key=lambda i: (normed[i], -i)) == doc.gold)
    return out


def mean_stderr(values: list[float]) -> float | None:
    """Standard error of the mean with the sample (n - 1) standard deviation; None when n < 2."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def select_indices(n_total: int, limit: int | None, seed: int = DEFAULT_SEED) -> list[int]:
    """A seeded subset of ``limit`` row indices in ascending order (all rows without a limit).

    It depends only on (n_total, limit, seed), never on the model, so every model is scored on
    the same rows and comparisons are paired.
    """
    if limit is None or limit >= n_total:
        return list(range(n_total))
    if limit < 1:
        raise FactorlmError(f"--limit must be at least 1, got {limit}")
    return sorted(random.Random(seed).sample(range(n_total), limit))


def chance_accuracy(name: str, limit: int | None = None, seed: int = DEFAULT_SEED) -> float:
    """Expected acc of uniform guessing on the rows a run scores: the mean of 1 / choices.

    A small model sits close to this floor on the harder tasks, so a compressed model's
    accuracy is best read against it, not against zero. Generation tasks (``greedy``) have 0.
    """
    spec = get_task(name)
    if spec.kind != "multiple_choice":
        return 0.0
    rows = spec.load()
    picked = select_indices(len(rows), limit, seed)
    return sum(1.0 / len(spec.to_doc(rows[i]).contexts) for i in picked) / len(picked)


# --- orchestration ---------------------------------------------------------------------------

@dataclass
class TaskResult:
    """One task's scores and what they were measured on."""

    task: str
    n: int
    n_total: int
    acc: float
    acc_stderr: float | None
    acc_norm: float | None
    acc_norm_stderr: float | None
    seconds: float
    source: str


def evaluate_task(model: Any, tokenizer: Any, name: str, *, limit: int | None = None, seed: int = DEFAULT_SEED,
                  batch_size: int = 8, max_length: int = 2048, progress: bool = True) -> TaskResult:
    """Score one registered task on its seeded subset."""
    spec = get_task(name)
    rows = spec.load()
    picked = select_indices(len(rows), limit, seed)
    docs = [spec.to_doc(rows[i]) for i in picked]
    requests = [(c, k) for d in docs for c, k in zip(d.contexts, d.continuations)]
    t0 = time.perf_counter()
    scores = score_requests(model, tokenizer, requests, batch_size=batch_size, max_length=max_length,
                            progress=progress, desc=name)
    per_doc, pos = [], 0
    for d in docs:
        k = len(d.contexts)
        per_doc.append(doc_metrics(d, scores[pos:pos + k], spec.kind))
        pos += k
    accs = [m["acc"] for m in per_doc]
    norms = [m["acc_norm"] for m in per_doc if "acc_norm" in m]
    has_norm = len(norms) == len(per_doc) and bool(norms)
    return TaskResult(task=name, n=len(docs), n_total=len(rows), acc=sum(accs) / len(accs),
                      acc_stderr=mean_stderr(accs), acc_norm=sum(norms) / len(norms) if has_norm else None,
                      acc_norm_stderr=mean_stderr(norms) if has_norm else None,
                      seconds=time.perf_counter() - t0, source=spec.source)


def summarize(results: list[TaskResult]) -> dict[str, float | None]:
    """Averages over tasks: ``average`` of acc; ``average_norm`` of acc_norm where a task
    defines it and acc where it does not (lm-eval reports acc only for winogrande/boolq/mmlu)."""
    if not results:
        return {"average": None, "average_norm": None}
    return {"average": sum(r.acc for r in results) / len(results),
            "average_norm": sum(r.acc_norm if r.acc_norm is not None else r.acc for r in results) / len(results)}


def evaluate_zeroshot(model: Any, tokenizer: Any, tasks: list[str], *, limit: int | None = None,
                      seed: int = DEFAULT_SEED, batch_size: int = 8, progress: bool = True) -> dict[str, Any]:
    """Score ``tasks`` and return the JSON-ready report (per task, averages, settings)."""
    for name in tasks:
        get_task(name)  # fail on a typo before any scoring
    max_length = int(getattr(getattr(model, "config", None), "max_position_embeddings", 2048) or 2048)
    results = []
    for name in tasks:
        r = evaluate_task(model, tokenizer, name, limit=limit, seed=seed, batch_size=batch_size,
                          max_length=max_length, progress=progress)
        logger.info("%s: acc %.4f%s (n=%d, %.0f s)", name, r.acc,
                    f", acc_norm {r.acc_norm:.4f}" if r.acc_norm is not None else "", r.n, r.seconds)
        results.append(r)
    return {"tasks": {r.task: r.__dict__ for r in results}, **summarize(results),
            "limit": limit, "seed": seed, "num_fewshot": 0}


def write_json_atomic(path: str | Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as JSON through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
