"""Tiny models and tokenizers built in code, for tests and examples (no model hub).

Every architecture of the table gets a small random-weight config with GQA, head_dim 32
(the smallest head size vLLM's CPU attention accepts) and a byte-level BPE tokenizer
trained in a fraction of a second on built-in text, with a ChatML chat template.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = """
The quick brown fox jumps over the lazy dog. A factored layer stores two thin matrices
instead of one wide one. Low rank compression keeps the directions that carry the most
energy of the activations. Paris is the capital of France; Berlin is the capital of Germany.
Language models predict the next token from the tokens before it. Serving engines batch
requests so that the weights are read once for many sequences. The license grants
permission to use, copy, modify and distribute this software for any purpose.
Once upon a time there was a small model that learned to speak in short sentences.
""" * 4

_COMMON = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", rope_theta=10000.0),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "qwen2": dict(model_type="qwen2", use_sliding_window=False),
    "qwen3": dict(model_type="qwen3", use_sliding_window=False),
    "gemma3_text": dict(model_type="gemma3_text", sliding_window=16, tie_word_embeddings=True,
                        query_pre_attn_scalar=32, layer_types=["sliding_attention", "full_attention"]),
}


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_COMMON["vocab_size"],
        special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    return tok.to_str()


def make_tiny_tokenizer() -> Any:
    """A byte-level BPE tokenizer (any text encodes) with ChatML special tokens."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_config(arch: str = "llama", **overrides: Any) -> Any:
    """A small HF config of the given model_type (see TINY_CONFIGS)."""
    from transformers import AutoConfig

    if arch not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {arch!r}; choose from {sorted(TINY_CONFIGS)}")
    values = {**_COMMON, **TINY_CONFIGS[arch], **overrides}
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def make_tiny_model(arch: str = "llama", seed: int = 0, **overrides: Any) -> tuple[Any, Any]:
    """(model, tokenizer): a random-weight causal LM of ``arch`` in fp32 eval mode.

    Weights are drawn with a larger std than HF's default so that greedy decoding is not
    degenerate and factorization errors are visible in the logits.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2)
    return model.eval(), make_tiny_tokenizer()


def save_tiny_dense(path: str | Path, arch: str = "llama", *, dtype: torch.dtype = torch.float32,
                    max_shard_size: str | None = None, **overrides: Any) -> Path:
    """Write a tiny dense HF folder (model in ``dtype`` + tokenizer) and return its path; with
    ``max_shard_size`` the weights are HF shards with an index, as large sources are."""
    model, tokenizer = make_tiny_model(arch, **overrides)
    path = Path(path)
    model.to(dtype).save_pretrained(path, max_shard_size=max_shard_size or "5GB")
    tokenizer.save_pretrained(path)
    return path


def checkpoint_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (one file or shards), by name."""
    from safetensors import safe_open

    from .runtime.checkpoint import safetensors_files

    out: dict[str, torch.Tensor] = {}
    for f in safetensors_files(Path(path)):
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def write_tiny_factored(path: str | Path, arch: str = "llama", ranks: dict[str, int] | None = None,
                        rank: int = 16, **overrides: Any) -> Path:
    """Write a tiny factored checkpoint; by default every block linear gets ``rank``."""
    from .runtime.arch import compressible_linears
    from .runtime.checkpoint import factorize_model, save_factored

    model, tokenizer = make_tiny_model(arch, **overrides)
    if ranks is None:
        ranks = {name: min(rank, m.in_features, m.out_features) for name, m in compressible_linears(model).items()}
    factorize_model(model, ranks)
    return save_factored(model, path, tokenizer=tokenizer)
