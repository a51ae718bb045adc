"""Architecture table: where the compressible linear layers of each model family live.

Code elsewhere asks this registry (keyed by ``config.model_type``) instead of matching
strings on model names. Adding a family is one ``register_arch`` call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .format import FactorlmError


@dataclass(frozen=True)
class ArchSpec:
    """Layout of a decoder-only family as transformers implements it.

    ``final_norm_path`` is the norm between the last block and the LM head (the compressor
    maps teacher hidden states to logits through it). ``attention`` / ``mlp`` name the
    sublayer attribute of a decoder block and its projections in execution order; ``fused`` says which projections vLLM fuses into one
    layer (its name -> the HF pieces), which the vLLM plugin needs to place factors.
    """

    name: str
    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    final_norm_path: str = "model.norm"
    attention: tuple[str, tuple[str, ...]] = ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"))
    mlp: tuple[str, tuple[str, ...]] = ("mlp", ("gate_proj", "up_proj", "down_proj"))
    fused: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    )

    def block_linear_names(self) -> list[str]:
        """Names of the compressible linears relative to one decoder block, in execution order."""
        names = [f"{self.attention[0]}.{p}" for p in self.attention[1]]
        names += [f"{self.mlp[0]}.{p}" for p in self.mlp[1]]
        return names


_REGISTRY: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Add a family to the table; each model_type may be claimed once."""
    for model_type in spec.model_types:
        if model_type in _REGISTRY and _REGISTRY[model_type] is not spec:
            raise ValueError(f"model_type {model_type!r} is already registered to {_REGISTRY[model_type].name}")
        _REGISTRY[model_type] = spec
    return spec


register_arch(ArchSpec(name="llama", model_types=("llama",)))
register_arch(ArchSpec(name="mistral", model_types=("mistral",)))
register_arch(ArchSpec(name="qwen2", model_types=("qwen2",)))
register_arch(ArchSpec(name="qwen3", model_types=("qwen3",)))
register_arch(ArchSpec(name="gemma3", model_types=("gemma3_text",)))


def supported_model_types() -> list[str]:
    """Every config.model_type factorlm knows, sorted."""
    return sorted(_REGISTRY)


def get_arch(config_or_type: object) -> ArchSpec:
    """The ArchSpec of an HF config (or a model_type string); a clear error lists the supported ones."""
    model_type = config_or_type if isinstance(config_or_type, str) else getattr(config_or_type, "model_type", None)
    spec = _REGISTRY.get(model_type)  # type: ignore[arg-type]
    if spec is None:
        raise FactorlmError(
            f"unsupported architecture {model_type!r}; supported model_type values: {', '.join(supported_model_types())}"
        )
    return spec


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks of an HF causal LM."""
    spec = get_arch(model.config)
    return model.get_submodule(spec.layers_path)  # type: ignore[return-value]


def compressible_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Fully-qualified name -> module for every decoder-block projection, in execution order.

    The modules are ``nn.Linear`` in a dense model and may already be ``FactoredLinear``.
    """
    spec = get_arch(model.config)
    layers = model.get_submodule(spec.layers_path)
    out: dict[str, nn.Module] = {}
    for index, block in enumerate(layers):
        for local in spec.block_linear_names():
            out[f"{spec.layers_path}.{index}.{local}"] = block.get_submodule(local)
    return out
