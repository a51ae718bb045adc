"""Helpers of the vLLM tests: tiny mixed factored checkpoints, torch references, engines."""

from __future__ import annotations

from pathlib import Path

PROMPTS = ["The quick brown fox", "Paris is the capital of", "Once upon a time there was"]
NEW_TOKENS = 16
KV_CACHE_BYTES = 32 * 2**20


def mixed_ranks(num_layers: int = 2) -> dict[str, int]:
    """Ranks that exercise every fused-group shape: all factored, mixed, all dense.

    Layer 0: every projection factored with its own rank. Layer 1: q and o factored while
    k, v stay dense; gate dense while up is factored; down dense.
    """
    ranks: dict[str, int] = {}
    for i in range(num_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        if i % 2 == 0:
            ranks.update({a + "q_proj": 8, a + "k_proj": 4, a + "v_proj": 6, a + "o_proj": 12,
                          m + "gate_proj": 10, m + "up_proj": 14, m + "down_proj": 16})
        else:
            ranks.update({a + "q_proj": 5, a + "o_proj": 9, m + "up_proj": 12})
    return ranks


def write_mixed(path: Path, arch: str, **overrides) -> Path:
    from factorlm.testing import write_tiny_factored

    return write_tiny_factored(path, arch, ranks=mixed_ranks(), **overrides)


def prompt_ids(model_dir: Path) -> list[list[int]]:
    from factorlm.runtime.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    return [tokenizer(p).input_ids for p in PROMPTS]


def reference_tokens(model_dir: Path, prompts: list[list[int]], hook=None) -> list[list[int]]:
    """Greedy tokens of the factorlm torch runtime (``hook(model)`` may modify it first)."""
    import torch

    from factorlm.runtime.checkpoint import load_model
    from factorlm.runtime.generate import SamplingParams, generate_tokens

    model = load_model(model_dir)
    if hook is not None:
        hook(model)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    return [list(generate_tokens(model, torch.tensor([ids]), params)) for ids in prompts]


def make_llm(model_dir: Path, **kwargs):
    from vllm import LLM

    options = dict(dtype="float32", max_model_len=256, max_num_seqs=8, enforce_eager=True, seed=0,
                   kv_cache_memory_bytes=KV_CACHE_BYTES)
    options.update(kwargs)
    return LLM(model=str(model_dir), **options)


def vllm_tokens(llm, prompts: list[list[int]], lora_request=None) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, lora_request=lora_request,
                           use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def shutdown(llm) -> None:
    """Free an in-process engine so the next one can start in the same process."""
    import gc

    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - best effort during teardown
        pass
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()
