"""The exported folder runs under onnxruntime-genai: its greedy tokens equal factorlm's ONNX generator.

``og.Model(folder)`` reads the ``genai_config.json`` that ``factorlm export onnx`` writes; the
runtime's own generator (its KV handling, position ids, stop ids) must reproduce
``OnnxGenerator`` token for token, including where it stops.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

og = pytest.importorskip("onnxruntime_genai")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from factorlm.exporters.onnx import OnnxGenerator, export_onnx  # noqa: E402
from factorlm.runtime.checkpoint import load_model  # noqa: E402
from factorlm.runtime.generate import SamplingParams, generate_tokens  # noqa: E402
from factorlm.testing import write_tiny_factored  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 40, 50, 60, 70], [20, 21], [3], list(range(30, 90))]
NEW_TOKENS = 24


def genai_greedy(folder: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """New tokens from onnxruntime-genai's greedy search; a final stop token is dropped, as
    factorlm's generators do not emit it."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + max_new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    out: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    eos = json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"]
    stops = set(eos) if isinstance(eos, list) else {eos}
    if out and out[-1] in stops:
        out = out[:-1]
    return out


def factorlm_greedy(folder: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    gen = OnnxGenerator(folder, threads=1, device="cpu")
    return list(gen.generate_tokens(prompt, SamplingParams(max_new_tokens=max_new_tokens), gen.eos_ids()))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A tiny factored llama whose generation config adds a stop id the first prompt reaches
    greedily at step 6 (config.json's EOS alone would never stop it): (onnx folder, that id)."""
    root = tmp_path_factory.mktemp("genai")
    ckpt = write_tiny_factored(root / "ckpt", "llama")
    model = load_model(ckpt)
    greedy = list(generate_tokens(model, torch.tensor([PROMPTS[0]]), SamplingParams(max_new_tokens=8, ignore_eos=True)))
    stop = next(t for i, t in enumerate(greedy) if i >= 5 and t not in greedy[:i])
    assert stop != model.config.eos_token_id
    (ckpt / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [model.config.eos_token_id, stop], "pad_token_id": 0}))
    out = root / "onnx"
    export_onnx(ckpt, out, threads=1, validate=False)
    return out, stop


def test_genai_config_declares_our_graph(exported) -> None:
    out, stop = exported
    cfg = json.loads((out / "genai_config.json").read_text())
    decoder = cfg["model"]["decoder"]
    assert decoder["inputs"]["position_ids"] == "position_ids"
    assert cfg["search"]["past_present_share_buffer"] is False
    # config.json's EOS first, then the generation config's extra stop id
    assert cfg["model"]["eos_token_id"] == [2, stop]
    assert cfg["model"]["pad_token_id"] == 0 and cfg["model"]["bos_token_id"] == 1  # 0 is an id, not "unset"
    assert cfg["model"]["context_length"] == cfg["search"]["max_length"] == 256


@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_genai_greedy_tokens_equal_factorlm_onnx_generator(exported, index: int) -> None:
    out, stop = exported
    prompt = PROMPTS[index]
    ours = factorlm_greedy(out, prompt, NEW_TOKENS)
    assert genai_greedy(out, prompt, NEW_TOKENS) == ours
    if index == 0:  # this prompt reaches the generation config's stop id: both stop there
        assert len(ours) < NEW_TOKENS and stop not in ours


def test_genai_reads_our_tokenizer(exported) -> None:
    out, _ = exported
    from transformers import AutoTokenizer

    text = "The quick brown fox jumps over the lazy dog."
    tokenizer = og.Tokenizer(og.Model(str(out)))
    assert list(tokenizer.encode(text)) == AutoTokenizer.from_pretrained(out)(text)["input_ids"]


@pytest.mark.slow
def test_genai_on_the_factored_sample_model(tmp_path: Path) -> None:
    """The sample model compressed with plain SVD at keep 0.7, exported, a chat prompt: genai and
    factorlm's ONNX generator give the same greedy tokens (and stop at the same EOS when one comes)."""
    from factorlm.cli import main

    ckpt = tmp_path / "smol-svd07"
    assert main(["compress", "sample", "--method", "svd", "--keep", "0.7", "-o", str(ckpt), "--no-progress"]) == 0
    out = tmp_path / "onnx"
    export_onnx(ckpt, out, threads=2)
    check_chat_prompts(out)


def check_chat_prompts(out: Path, max_new_tokens: int = 48) -> None:
    """genai and OnnxGenerator agree on greedy chat answers from the exported folder ``out``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    for question in ("What is the capital of France?", "Write a haiku about the sea."):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        assert genai_greedy(out, prompt, max_new_tokens) == factorlm_greedy(out, prompt, max_new_tokens)
