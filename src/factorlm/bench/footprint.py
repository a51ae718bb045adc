"""What one decode step must read, and how much memory a process holds.

Decode at small batch is memory-bound: each step streams every weight once (shared by
the whole batch) plus each sequence's KV cache. ``ModelFootprint`` counts those bytes
from a checkpoint's safetensors headers and config, without loading any weights, so the
same number applies to every engine that runs the checkpoint at a given dtype.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..runtime.format import FactorlmError


def tensor_numels(model_dir: str | os.PathLike) -> dict[str, int]:
    """Element count of every tensor in a folder's ``*.safetensors`` files (headers only)."""
    root = Path(model_dir)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FactorlmError(f"{root}: no .safetensors files to count weights from")
    out: dict[str, int] = {}
    for path in files:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for dim in info["shape"]:
                numel *= int(dim)
            out[name] = numel
    return out


def input_embedding_name(config: object) -> str:
    """State-dict name of the input embedding, asked of a model built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    emb = model.get_input_embeddings().weight
    for name, param in model.named_parameters(remove_duplicate=False):
        if param is emb:
            return name
    raise FactorlmError(f"{type(model).__name__}: input embedding not found among the parameters")


def kv_read_bytes(layers: int, kv_heads: int, head_dim: int, context: float, element_bytes: int) -> float:
    """Bytes of K and V one sequence reads in one decode step at ``context`` cached tokens."""
    return 2.0 * layers * kv_heads * head_dim * context * element_bytes


@dataclass(frozen=True)
class ModelFootprint:
    """Element counts that decide the bytes a decode step reads.

    ``weight_elements`` counts every stored tensor once (a tied LM head shares the
    embedding). ``embedding_elements`` is the input embedding: a step gathers only one
    row of it per sequence unless the LM head is tied to it, in which case the head
    reads all of it anyway.
    """

    weight_elements: int
    embedding_elements: int
    tied_embeddings: bool
    hidden_size: int
    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_folder(cls, model_dir: str | os.PathLike) -> ModelFootprint:
        """Read a dense or factored checkpoint folder's headers and config."""
        from transformers import AutoConfig

        root = Path(model_dir)
        config = AutoConfig.from_pretrained(root)
        text = getattr(config, "text_config", None) or config
        numels = tensor_numels(root)
        emb_name = input_embedding_name(config)
        if emb_name not in numels:
            raise FactorlmError(f"{root}: tensor {emb_name} (the input embedding) is not in the safetensors files")
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(
            weight_elements=sum(numels.values()),
            embedding_elements=numels[emb_name],
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            hidden_size=text.hidden_size,
            layers=text.num_hidden_layers,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
        )

    def weight_bytes(self, element_bytes: int) -> int:
        """Bytes of all stored weights at ``element_bytes`` per element."""
        return self.weight_elements * element_bytes

    def step_weight_bytes(self, batch: int, element_bytes: int) -> int:
        """Weight bytes one decode step of ``batch`` sequences reads (weights are shared by the batch)."""
        elements = self.weight_elements
        if not self.tied_embeddings:
            elements += -self.embedding_elements + batch * self.hidden_size
        return elements * element_bytes

    def step_bytes(self, batch: int, context: float, element_bytes: int, kv_element_bytes: int | None = None) -> float:
        """Weights plus every sequence's KV cache at an average of ``context`` cached tokens."""
        kv = kv_read_bytes(self.layers, self.kv_heads, self.head_dim, context, kv_element_bytes or element_bytes)
        return self.step_weight_bytes(batch, element_bytes) + batch * kv


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Resident set size of this process now, or None where /proc is not available."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """High-water mark of the resident set since start or the last ``reset_peak_rss``."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux ``clear_refs`` 5); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
