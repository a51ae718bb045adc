import pytest
import torch

from factorlm.runtime.arch import compressible_linears
from factorlm.runtime.checkpoint import factorize_model
from factorlm.runtime.generate import (
    SamplingParams,
    encode_prompt,
    filter_logits,
    find_stop,
    generate_tokens,
    stream_text,
)
from factorlm.runtime.format import FactorlmError
from factorlm.testing import TINY_CONFIGS, make_tiny_model


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_greedy_matches_transformers_generate_at_full_rank(arch):
    model, tok = make_tiny_model(arch)
    factorize_model(model, {n: min(m.in_features, m.out_features) for n, m in compressible_linears(model).items()})
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    ours = list(generate_tokens(model, ids, SamplingParams(max_new_tokens=16)))
    ref = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == ref[0, ids.shape[1]:].tolist()


def test_sampling_is_seeded():
    model, tok = make_tiny_model()
    ids = tok("Paris is", return_tensors="pt").input_ids
    p = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    a = list(generate_tokens(model, ids, p))
    b = list(generate_tokens(model, ids, p))
    c = list(generate_tokens(model, ids, SamplingParams(max_new_tokens=12, temperature=1.0, seed=8)))
    assert a == b and a != c


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    # softmax([4,3,2,1]) = [.64, .24, .09, .03]: top_p .8 keeps the first two
    assert torch.isinf(filter_logits(logits, 0, 0.8)).tolist() == [[False, False, True, True]]
    # a top_p below float32 resolution still keeps the most likely token, whatever its position
    peaked = torch.tensor([[0.0, 200.0, 0.0]])
    assert torch.isinf(filter_logits(peaked, 0, 1e-300)).tolist() == [[True, False, True]]


def test_eos_stops_generation():
    model, tok = make_tiny_model()
    ids = tok("The quick", return_tensors="pt").input_ids
    first = list(generate_tokens(model, ids, SamplingParams(max_new_tokens=4)))
    out = list(generate_tokens(model, ids, SamplingParams(max_new_tokens=4), stop_ids={first[1]}))
    assert out == first[:1]


def test_stop_string_is_not_emitted():
    model, tok = make_tiny_model()
    ids = tok("The quick", return_tensors="pt").input_ids
    full = "".join(stream_text(model, tok, ids, SamplingParams(max_new_tokens=24)))
    stop = full[5:8]
    cut = "".join(stream_text(model, tok, ids, SamplingParams(max_new_tokens=24, stop=(stop,))))
    assert cut == full[: full.find(stop)]


def test_find_stop():
    assert find_stop("hello world", ["wor", "lo"]) == 3
    assert find_stop("hello", ["x"]) == -1


def test_chat_template_is_used():
    _, tok = make_tiny_model()
    ids = encode_prompt(tok, "hi", chat=True)
    assert tok.decode(ids[0]).startswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_bad_params():
    with pytest.raises(FactorlmError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(FactorlmError, match="temperature"):
        SamplingParams(temperature=-1)
