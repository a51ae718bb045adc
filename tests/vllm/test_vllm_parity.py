"""vLLM serves factored checkpoints: greedy tokens equal the factorlm torch runtime's.

One in-process engine per checkpoint (tiny llama, qwen3, and qwen2 with random qkv
biases; head_dim 32, fp32). The checkpoints mix factored and dense pieces inside vLLM's
fused layers (see ``vllm_helpers.mixed_ranks``), so every loader path (q/k/v and gate/up
shard ids, dense pieces, per-piece ranks) runs. LoRA on top of a factored model is checked against a
reference that adds the adapter's B·A·x to each targeted module of the torch runtime.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from vllm_helpers import make_llm, mixed_ranks, prompt_ids, reference_tokens, shutdown, vllm_tokens, write_mixed

pytestmark = pytest.mark.vllm

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_RANK, LORA_ALPHA = 4, 8


def _quant_methods(model: torch.nn.Module) -> dict[str, str]:
    return {name.removesuffix(".base_layer"): type(m.quant_method).__name__ for name, m in model.named_modules()
            if type(m).__name__.endswith("Linear") and hasattr(m, "quant_method")}


@pytest.fixture(scope="module")
def llama(vllm_module, tmp_path_factory):
    path = write_mixed(tmp_path_factory.mktemp("vllm") / "tiny-llama-factored", "llama")
    prompts = prompt_ids(path)
    llm = make_llm(path, enable_lora=True, max_lora_rank=8, max_loras=1)
    yield path, prompts, llm
    shutdown(llm)


def test_llama_greedy_parity_with_mixed_fused_groups(llama) -> None:
    path, prompts, llm = llama
    assert vllm_tokens(llm, prompts) == reference_tokens(path, prompts)


def test_layers_get_their_own_method(llama) -> None:
    _, _, llm = llama
    methods = llm.apply_model(_quant_methods)[0]
    layer0 = {k.split(".", 3)[-1]: v for k, v in methods.items() if ".layers.0." in k}
    layer1 = {k.split(".", 3)[-1]: v for k, v in methods.items() if ".layers.1." in k}
    assert set(layer0.values()) == {"FactoredLinearMethod"}, layer0
    # layer 1: qkv and gate_up are mixed groups (factored method), down_proj is dense
    assert layer1["self_attn.qkv_proj"] == "FactoredLinearMethod"
    assert layer1["mlp.gate_up_proj"] == "FactoredLinearMethod"
    assert layer1["mlp.down_proj"] == "UnquantizedLinearMethod"


def _write_lora(path: Path, hidden: int, sizes: dict[str, tuple[int, int]], layers: int) -> dict[str, torch.Tensor]:
    """A PEFT-format LoRA adapter (safetensors) on every block projection; returns its tensors."""
    gen = torch.Generator().manual_seed(7)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for name in LORA_TARGETS:
            sub = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out_f, in_f = sizes[name]
            key = f"base_model.model.model.layers.{i}.{sub}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(LORA_RANK, in_f, generator=gen) * 0.2
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, LORA_RANK, generator=gen) * 0.2
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": LORA_RANK, "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0, "bias": "none", "target_modules": list(LORA_TARGETS),
        "base_model_name_or_path": None, "fan_in_fan_out": False, "modules_to_save": None,
    }))
    return tensors


def test_lora_adapter_on_a_factored_model(llama, tmp_path: Path) -> None:
    from vllm.lora.request import LoRARequest

    path, prompts, llm = llama
    config = json.loads((path / "config.json").read_text())
    h, inter, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    sizes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
             "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    tensors = _write_lora(tmp_path / "adapter", h, sizes, config["num_hidden_layers"])
    scale = LORA_ALPHA / LORA_RANK

    def add_lora(model: torch.nn.Module) -> None:
        for key in {k.rsplit(".lora_", 1)[0] for k in tensors}:
            module = model.get_submodule(key.removeprefix("base_model.model."))
            a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
            module.register_forward_hook(lambda m, args, out, a=a, b=b: out + scale * (args[0] @ a.T) @ b.T)

    expected = reference_tokens(path, prompts, hook=add_lora)
    assert expected != reference_tokens(path, prompts), "the adapter must change the output to prove anything"
    assert vllm_tokens(llm, prompts, LoRARequest("corrector", 1, str(tmp_path / "adapter"))) == expected
    # requests without the adapter in the same engine still see the plain factored model
    assert vllm_tokens(llm, prompts) == reference_tokens(path, prompts)


def _randomize_biases(path: Path) -> None:
    """Give every bias tensor of the checkpoint random values (HF initialises them to zero)."""
    from safetensors.torch import load_file

    file = path / "model.safetensors"
    tensors = load_file(str(file))
    gen = torch.Generator().manual_seed(3)
    for key in [k for k in tensors if k.endswith(".bias")]:
        tensors[key] = torch.randn(tensors[key].shape, generator=gen) * 0.5
    save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.mark.parametrize(("arch", "gemm"), [("qwen3", "torch"), ("qwen2", "vllm")])
def test_qwen_greedy_parity(vllm_module, tmp_path: Path, monkeypatch, arch: str, gemm: str) -> None:
    """qwen3 (q/k norms) with torch's GEMMs; qwen2 (qkv bias added after the factored GEMMs)."""
    monkeypatch.setenv("FACTORLM_VLLM_CPU_GEMM", gemm)
    # vLLM's qwen2 derives head_dim as hidden_size / heads, so keep the two consistent (128 / 4 = 32)
    path = write_mixed(tmp_path / f"tiny-{arch}-factored", arch, **({"hidden_size": 128} if arch == "qwen2" else {}))
    _randomize_biases(path)
    prompts = prompt_ids(path)
    llm = make_llm(path)
    try:
        assert vllm_tokens(llm, prompts) == reference_tokens(path, prompts)
    finally:
        shutdown(llm)


def test_unknown_format_version_fails_with_factorlm_message(vllm_module, tmp_path: Path) -> None:
    from factorlm.testing import write_tiny_factored

    path = write_tiny_factored(tmp_path / "future", "llama", ranks={"model.layers.0.self_attn.q_proj": 8})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="unknown factorlm format_version 99") as info:
        make_llm(path)
    assert "Upgrade factorlm or re-export the checkpoint" in str(info.value)


def test_mixed_ranks_cover_every_group_shape() -> None:
    ranks = mixed_ranks()
    assert {"model.layers.1.self_attn.k_proj", "model.layers.1.mlp.gate_proj"}.isdisjoint(ranks)
    assert "model.layers.1.self_attn.q_proj" in ranks and "model.layers.0.self_attn.k_proj" in ranks
