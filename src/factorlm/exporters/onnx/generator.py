"""Prefill + decode loop in ONNX Runtime, with IOBinding so the KV cache never leaves the device.

Each step binds the previous step's ``present.*`` OrtValues directly as the next
``past_key_values.*`` inputs (no numpy round trip of the cache); only the last-position
logits come back to the host for sampling. With onnxruntime-gpu installed and the CUDA
execution provider available, the cache lives on the GPU.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...runtime.format import FactorlmError
from ...runtime.decode import GenerationStats, SamplingParams, decode_batch, decode_tokens
from .graph import CacheShape
from .metadata import read_metadata

log = logging.getLogger(__name__)


def choose_providers(device: str) -> list[str]:
    """Execution providers for ``device`` ('cpu', 'cuda' or 'auto': CUDA when available)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device not in ("cpu", "cuda", "auto"):
        raise FactorlmError(f"unknown ONNX device {device!r}; choose cpu, cuda or auto")
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise FactorlmError("the CUDA execution provider is not available; install the 'onnx-gpu' extra "
                            "(onnxruntime-gpu) on a machine with an NVIDIA GPU, or use --onnx-device cpu")
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxGenerator:
    """Generate from a folder written by ``factorlm export onnx``.

    ``generate_tokens`` and ``stream_text`` mirror ``factorlm.runtime.generate`` (same
    ``SamplingParams`` and ``GenerationStats``); ``generate_batch`` runs several prompts
    together with left padding.
    """

    def __init__(self, onnx_dir: str | os.PathLike, *, threads: int | None = None, device: str = "auto") -> None:
        import onnxruntime as ort

        self.path = Path(onnx_dir)
        self.meta = read_metadata(self.path)
        model_file = self.path / self.meta["model_file"]
        if not model_file.is_file():
            raise FactorlmError(f"{model_file}: graph file missing")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.providers = choose_providers(device)
        self.session = ort.InferenceSession(str(model_file), options, providers=self.providers)
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.shape = CacheShape(self.meta["num_layers"], self.meta["num_kv_heads"], self.meta["head_dim"])
        self.kv_dtype = np.float16 if self.meta["inputs"][3]["type"] == "float16" else np.float32
        self.past_names = [i["name"] for i in self.meta["inputs"][3:]]
        self.present_names = [o["name"] for o in self.meta["outputs"][1:]]
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self._tokenizer

    def eos_ids(self) -> set[int]:
        """EOS ids from the generation config, the model metadata and the tokenizer."""
        ids = set(self.meta.get("eos_token_id", []))
        gen_cfg = self.path / "generation_config.json"
        if gen_cfg.is_file():
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else (eos or []))
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if isinstance(tok_eos, int):
            ids.add(tok_eos)
        return ids

    def _empty_past(self, batch: int) -> list[Any]:
        import onnxruntime as ort

        empty = np.zeros((batch, self.shape.num_kv_heads, 0, self.shape.head_dim), self.kv_dtype)
        return [ort.OrtValue.ortvalue_from_numpy(empty, self.device, 0) for _ in self.past_names]

    def step(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[Any]) -> tuple[np.ndarray, list[Any]]:
        """One forward pass: last-position logits [B, V] (host, fp32) and the presents (on device)."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(pos, np.int64))
        for name, value in zip(self.past_names, past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()[:, -1].astype(np.float32)
        return logits, outputs[1:]

    def generate_batch(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                       stop_ids: set[int] | None = None) -> list[list[int]]:
        """New tokens per prompt (left-padded batch); a row stops at its first stop id (not included)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise FactorlmError("generate_batch needs at least one prompt and no empty prompt")
        ids, mask = left_padded(prompts)
        return decode_batch(self.lm(), ids, params, stop_ids, attention_mask=mask)

    def lm(self) -> OnnxLM:
        """This graph as a ``CausalLM`` for the runtime's decode loop."""
        return OnnxLM(self)

    def generate_tokens(self, input_ids: torch.Tensor | Sequence[int], params: SamplingParams,
                        stop_ids: set[int] | None = None, stats: GenerationStats | None = None) -> Iterator[int]:
        """Yield new token ids for one prompt, like ``runtime.generate.generate_tokens``."""
        return decode_tokens(self.lm(), _prompt_tensor(input_ids), params, stop_ids, stats)

    def stream_text(self, tokenizer: Any, input_ids: torch.Tensor | Sequence[int], params: SamplingParams,
                    stats: GenerationStats | None = None) -> Iterator[str]:
        """Decoded text pieces, stopping at EOS or before the first stop string (not emitted)."""
        from ...runtime.generate import stream_lm_text

        return stream_lm_text(self.lm(), tokenizer, _prompt_tensor(input_ids), params, self.eos_ids(), stats)


def _prompt_tensor(input_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    prompt = torch.as_tensor(input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids),
                             dtype=torch.long)
    prompt = prompt.reshape(1, -1) if prompt.dim() == 1 else prompt
    if prompt.dim() != 2 or prompt.shape[0] != 1 or prompt.shape[1] == 0:
        raise FactorlmError(f"generate_tokens takes one non-empty prompt, got shape {tuple(prompt.shape)}")
    return prompt


def left_padded(prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, W] of prompts aligned to the right, and their 0/1 attention mask [B, W]."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[r, width - len(p):] = 1
    return ids, mask


class OnnxLM:
    """An exported graph as a ``CausalLM`` (``prefill`` / ``step``, any batch), the KV cache kept in OrtValues."""

    device = "cpu"  # where logits come back and where the sampler runs

    def __init__(self, generator: OnnxGenerator) -> None:
        self.generator = generator
        self.past: list[Any] = []
        self.mask = np.ones((1, 0), np.int64)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        prompt = input_ids.numpy().astype(np.int64)
        self.mask = (np.ones_like(prompt) if attention_mask is None else attention_mask.numpy().astype(np.int64))
        pos = np.clip(self.mask.cumsum(-1) - 1, 0, None)
        logits, self.past = self.generator.step(prompt, self.mask, pos, self.generator._empty_past(prompt.shape[0]))
        return torch.from_numpy(logits)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        batch = self.mask.shape[0]
        self.mask = np.concatenate([self.mask, np.ones((batch, 1), np.int64)], axis=1)
        logits, self.past = self.generator.step(token.numpy().astype(np.int64).reshape(batch, 1), self.mask,
                                                self.mask.sum(-1, keepdims=True) - 1, self.past)
        return torch.from_numpy(logits)


def load_onnx_engine(onnx_dir: str | os.PathLike, *, threads: int | None = None, device: str = "auto") -> OnnxGenerator:
    """Factory for the server and the CLI: an ``OnnxGenerator`` over an exported folder."""
    return OnnxGenerator(onnx_dir, threads=threads, device=device)
