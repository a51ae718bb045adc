"""Perplexity: windowing matches a direct computation; CLI works on dense and factored folders."""

import math

import pytest
import torch
import torch.nn.functional as F

from factorlm.eval.perplexity import perplexity
from factorlm.runtime.format import FactorlmError
from factorlm.testing import make_tiny_model, save_tiny_dense, write_tiny_factored

TEXT = "the quick brown fox jumps over the lazy dog. " * 20


def test_windows_match_direct_computation():
    torch.set_num_threads(1)
    model, tok = make_tiny_model()
    model.eval()
    ids = torch.tensor(tok(TEXT, add_special_tokens=False)["input_ids"])[:50]
    res = perplexity(model, tok, TEXT, window=16, max_tokens=50, progress=False)
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, 50, 16):
            c = ids[s:s + 16]
            if c.numel() < 2:
                continue
            lp = F.log_softmax(model(input_ids=c[None]).logits[0].float(), -1)
            total -= lp[:-1].gather(1, c[1:, None]).sum().item()
            n += c.numel() - 1
    assert res.tokens_scored == n and res.windows == 4
    assert math.isclose(res.ppl, math.exp(total / n), rel_tol=1e-5)


def test_too_short_text_errors():
    model, tok = make_tiny_model()
    with pytest.raises(FactorlmError, match="too short"):
        perplexity(model, tok, "a", progress=False, max_tokens=1)


@pytest.mark.parametrize("kind", ["dense", "factored"])
def test_cli_ppl(tmp_path, capsys, kind):
    from factorlm.cli import main

    torch.set_num_threads(1)
    path = save_tiny_dense(tmp_path / "m") if kind == "dense" else write_tiny_factored(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert main(["eval", "ppl", str(path), "--text", str(text), "--window", "32", "--json", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert '"ppl"' in out and "NaN" not in out
