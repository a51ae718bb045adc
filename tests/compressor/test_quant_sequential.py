"""Sequential GPTQ: each decoder block's Grams are taken after the blocks upstream were quantized."""

from __future__ import annotations

import copy

import pytest
import torch

from factorlm.compressor.quantize import collect_grams, quantize_model, quantize_sequential
from factorlm.runtime.arch import decoder_layers
from factorlm.runtime.checkpoint import load_model
from factorlm.runtime.format import read_factored_config
from factorlm.testing import write_tiny_factored


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    path = write_tiny_factored(tmp_path_factory.mktemp("seq") / "factored", rank=16)
    model = load_model(path, fast_layout=False).float().eval()
    targets = list(read_factored_config(path).ranks)
    windows = torch.randint(0, 384, (4, 24), generator=torch.Generator().manual_seed(0))
    return model, targets, windows


def codes(model: torch.nn.Module, targets: list[str]) -> dict[str, torch.Tensor]:
    return {f"{t}.{p}": getattr(model.get_submodule(t), f"{p}_qweight").clone()
            for t in targets for p in ("weight_u", "weight_v")}


def test_each_block_quantized_on_the_quantized_upstream(tiny):
    model, targets, windows = tiny
    seq = copy.deepcopy(model)
    quantize_sequential(seq, targets, 4, 16, windows)
    # the same thing spelled out: one block at a time, Grams from a full forward of the model
    # whose earlier blocks are already quantized
    ref = copy.deepcopy(model)
    names = {id(m): n for n, m in ref.named_modules()}
    for block in decoder_layers(ref):
        local = [t for t in targets if t.startswith(names[id(block)] + ".")]
        quantize_model(ref, local, 4, 16, collect_grams(ref, local, windows))
    got, want = codes(seq, targets), codes(ref, targets)
    mismatched = sum(int((got[k] != want[k]).sum()) for k in got)
    total = sum(v.numel() for v in got.values())
    assert mismatched <= 1e-3 * total  # fp32 summation order only

    # and it is not the one-pass quantization: block 0 agrees, later blocks do not
    one = copy.deepcopy(model)
    quantize_model(one, targets, 4, 16, collect_grams(one, targets, windows))
    first = names[id(decoder_layers(ref)[0])] + "."
    onepass = codes(one, targets)
    later = [k for k in got if not k.startswith(first)]
    assert all(torch.equal(got[k], onepass[k]) for k in got if k.startswith(first))
    assert any(not torch.equal(got[k], onepass[k]) for k in later)
