"""Random-weight model pairs of real architectures' shapes, for speed benchmarks without a hub.

Decode speed depends on the shapes and ranks of the weights, never on their values, so a
dense model with a published model's configuration and random weights, and a factored copy
with uniform ranks and random factors, time exactly like the trained ones. This is what
lets the GPU benchmark run models larger than the sample model on a machine that cannot
download them, and build a pair in seconds instead of factorizing for minutes. Quality
numbers never come from these models.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..runtime.format import FactorlmError

log = logging.getLogger(__name__)

# Llama-family configurations (values from the models' published config.json files).
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                         rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=384, tie_word_embeddings=False, rope_theta=10000.0),
}


def synthetic_config(shape: str) -> Any:
    """The LlamaConfig of a named shape (see ``SHAPES``)."""
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise FactorlmError(f"unknown synthetic shape {shape!r}; choose from {', '.join(SHAPES)}")
    return LlamaConfig(max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                       **SHAPES[shape])


def random_dense(shape: str, dtype: torch.dtype = torch.bfloat16, device: str = "cpu", seed: int = 0) -> nn.Module:
    """A dense causal LM of ``shape`` with the architecture's own random initialisation."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(synthetic_config(shape), dtype=dtype)
    return model.eval()


def write_synthetic_source(shape: str, path: Path, *, dtype: torch.dtype = torch.bfloat16,
                           max_shard_size: str | int = "5GB", seed: int = 0, **overrides: Any) -> Path:
    """Write a random dense HF folder of ``shape`` shard by shard, one tensor in memory at a time.

    The skeleton lives on the meta device; each tensor is drawn when its shard is written
    (N(0, 0.02) matrices like HF's initialisation, ones for norms), so a 16 GB 8B-shape source
    needs about one embedding matrix of RAM. ``overrides`` change the config (e.g. fewer
    layers). Written to a temporary sibling and renamed, so a killed run leaves no half source.
    """
    import shutil

    from transformers import AutoModelForCausalLM

    from ..compressor.shard_writer import OutTensor, write_shards
    from ..runtime.checkpoint import params_on_meta
    from ..testing import make_tiny_tokenizer

    config = synthetic_config(shape)
    for key, value in overrides.items():
        setattr(config, key, value)
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.dtype = dtype
    model.config.architectures = [type(model).__name__]

    def draw(index: int, shape_: tuple[int, ...]) -> Any:
        def fetch() -> torch.Tensor:
            if len(shape_) == 1:
                return torch.ones(shape_, dtype=dtype)
            gen = torch.Generator().manual_seed(seed * 100003 + index)
            return torch.empty(shape_, dtype=dtype).normal_(0.0, 0.02, generator=gen)
        return fetch

    tied = f"{next(n for n, m in model.named_modules() if m is model.get_output_embeddings())}.weight" \
        if config.tie_word_embeddings else None
    tensors = [OutTensor(name, dtype, tuple(p.shape), draw(i, tuple(p.shape)))
               for i, (name, p) in enumerate(model.state_dict(keep_vars=True).items()) if name != tied]
    tmp = path.with_name(f".{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_shards(tmp, tensors, max_shard_size)
    model.config.save_pretrained(tmp)
    make_tiny_tokenizer().save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def uniform_plan(model: nn.Module, keep: float, multiple: int) -> dict[str, int]:
    """Ranks keeping ``keep`` of every block linear's parameters (layers that would not shrink stay dense)."""
    from ..compressor.budget import shapes_of, uniform_ranks
    from ..runtime.arch import compressible_linears

    plan = uniform_ranks(shapes_of(compressible_linears(model)), keep, multiple=multiple)
    return {name: rank for name, rank in plan.items() if rank is not None}


def randomize_factored(model: nn.Module, ranks: dict[str, int], seed: int = 0) -> None:
    """Replace the named linears by factored ones with random factors, in place.

    The factors are scaled so that ``U V x`` keeps roughly the scale of ``x`` (hidden states
    stay finite through the depth of the network; the values carry no meaning).
    """
    from ..runtime.checkpoint import replace_with_factored
    from ..runtime.factored_linear import FactoredLinear

    param = next(model.parameters())
    replace_with_factored(model, ranks, device=param.device)
    gen = torch.Generator(device=param.device).manual_seed(seed)
    with torch.no_grad():
        for name in ranks:
            layer = model.get_submodule(name)
            assert isinstance(layer, FactoredLinear)
            rank = layer.weight_v.shape[0]
            for p, fan_in in ((layer.weight_v, layer.weight_v.shape[1]), (layer.weight_u, rank)):
                p.copy_(torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
                        .mul_(fan_in ** -0.5).to(p.dtype))
            if layer.bias is not None:
                layer.bias.zero_()


def write_synthetic_pair(shape: str, keep: float, root: Path, *, dtype: torch.dtype = torch.bfloat16,
                         device: str = "cpu", multiple: int | None = None, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``root/<shape>-dense`` and ``root/<shape>-keep<keep>-m<multiple>`` (cached; rebuilt with ``overwrite``).

    Ranks are multiples of ``multiple``: by default 64 (tensor-core tiles) for models of
    hidden size 1024 and more, 8 below.
    """
    if multiple is None:
        multiple = 64 if SHAPES.get(shape, {}).get("hidden_size", 0) >= 1024 else 8
    from ..runtime.checkpoint import save_factored
    from ..testing import make_tiny_tokenizer

    dense_dir, factored_dir = root / f"{shape}-dense", root / f"{shape}-keep{keep}-m{multiple}"
    tokenizer = make_tiny_tokenizer()  # byte-level: any prompt text encodes to ids below every shape's vocab
    if overwrite or not (dense_dir / "config.json").is_file():
        log.info("building random dense %s in %s", shape, str(dtype).removeprefix("torch."))
        model = random_dense(shape, dtype, device)
        tmp = dense_dir.with_name(f".{dense_dir.name}.partial")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if dense_dir.exists():
            import shutil

            shutil.rmtree(dense_dir)
        tmp.rename(dense_dir)
        del model
    if overwrite or not (factored_dir / "config.json").is_file():
        model = random_dense(shape, dtype, device)
        ranks = uniform_plan(model, keep, multiple)
        if not ranks:
            raise FactorlmError(f"keep {keep} leaves every linear of {shape} dense (rank multiple {multiple})")
        log.info("building random factored %s at keep %s (%d factored linears)", shape, keep, len(ranks))
        randomize_factored(model, ranks)
        save_factored(model, factored_dir, tokenizer=tokenizer, overwrite=True)
    return dense_dir, factored_dir
