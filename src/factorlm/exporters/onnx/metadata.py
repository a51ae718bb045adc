"""The small JSON files written beside the graph: IO description and onnxruntime-genai config.

``genai_config.json`` lets the onnxruntime-genai runtime (``og.Model(folder)``) run our graph
with its own generator. What it must say, each checked by tests/onnx/test_genai.py:

* ``position_ids`` among the decoder inputs: our graph takes explicit positions, and genai
  feeds them only to an input the config names;
* ``past_present_share_buffer: false``: our presents are ``past + seq`` long, a fresh tensor per
  step, not a preallocated ``max_length`` buffer that the graph writes into;
* every stop id a factorlm generator stops at: the config's EOS, the generation config's and
  the tokenizer's (Llama-3-8B-Instruct's config.json lists only ``<|end_of_text|>``; its
  generation config adds ``<|eot_id|>``, which ends its turns), else genai keeps generating
  where factorlm stops;
* BOS / pad ids taken as written, 0 included (a falsy id is still an id);
* ``context_length`` and ``search.max_length``: the model's ``max_position_embeddings``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ...runtime.format import FactorlmError
from .graph import CacheShape, input_names, output_names

METADATA_FILE = "factorlm_onnx.json"
METADATA_VERSION = 1


def _eos_ids(config: Any) -> list[int]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def io_spec(shape: CacheShape, float_type: str) -> dict[str, list[dict[str, Any]]]:
    """Names, element types and symbolic shapes of the graph inputs and outputs."""
    kv = ["batch", shape.num_kv_heads, "past", shape.head_dim]
    present = ["batch", shape.num_kv_heads, "past + seq", shape.head_dim]
    ins = [{"name": "input_ids", "type": "int64", "shape": ["batch", "seq"]},
           {"name": "attention_mask", "type": "int64", "shape": ["batch", "past + seq"]},
           {"name": "position_ids", "type": "int64", "shape": ["batch", "seq"]}]
    ins += [{"name": n, "type": float_type, "shape": kv} for n in input_names(shape)[3:]]
    outs = [{"name": "logits", "type": float_type, "shape": ["batch", "seq", "vocab"]}]
    outs += [{"name": n, "type": float_type, "shape": present} for n in output_names(shape)[1:]]
    return {"inputs": ins, "outputs": outs}


def build_metadata(config: Any, *, dtype: str, int8: bool, opset: int, source: str, ranks: dict[str, int] | None,
                   external_data: bool, validation: dict[str, Any] | None, export_s: float) -> dict[str, Any]:
    shape = CacheShape.from_config(config)
    float_type = "float16" if dtype == "fp16" else "float32"
    return {
        "format": "factorlm-onnx", "version": METADATA_VERSION, "model_file": "model.onnx",
        "model_type": config.model_type, "source": source, "dtype": dtype, "int8": int8, "opset": opset,
        "external_data": external_data, "factored": ranks is not None, "ranks": ranks or {},
        "num_layers": shape.num_layers, "num_kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
        "vocab_size": config.vocab_size, "eos_token_id": _eos_ids(config),
        "notes": "attention_mask covers past + new tokens (1 = real, 0 = left padding); "
                 "position_ids = cumsum(attention_mask) - 1 for the new tokens",
        **io_spec(shape, float_type), "validation": validation, "export_s": round(export_s, 2),
    }


def read_metadata(onnx_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(onnx_dir) / METADATA_FILE
    if not path.is_file():
        raise FactorlmError(f"{path}: missing; not a folder written by 'factorlm export onnx'")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FactorlmError(f"{path}: not valid JSON ({exc})") from exc
    if meta.get("format") != "factorlm-onnx" or meta.get("version") != METADATA_VERSION:
        raise FactorlmError(f"{path}: unsupported format {meta.get('format')!r} version {meta.get('version')!r}")
    return meta


def stop_token_ids(config: Any, folder: str | os.PathLike | None = None) -> list[int]:
    """EOS ids a generator stops at: config.json's, then ``generation_config.json``'s and the
    tokenizer's EOS from ``folder`` (the export folder, side files copied), in that order."""
    ids = _eos_ids(config)
    if folder is not None:
        folder = Path(folder)
        gen_cfg = folder / "generation_config.json"
        if gen_cfg.is_file():
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            ids += [eos] if isinstance(eos, int) else list(eos or [])
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            tok_eos = getattr(AutoTokenizer.from_pretrained(folder), "eos_token_id", None)
            ids += [tok_eos] if isinstance(tok_eos, int) else []
    return list(dict.fromkeys(int(i) for i in ids))


def _token_id(config: Any, name: str, default: int) -> int:
    value = getattr(config, name, None)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return default if value is None else int(value)


def genai_config(config: Any, dtype: str, folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """A config for the onnxruntime-genai runtime (see the module docstring for what it must say);
    ``folder`` is the export folder whose generation config and tokenizer add stop ids."""
    shape = CacheShape.from_config(config)
    eos = stop_token_ids(config, folder)
    context = int(getattr(config, "max_position_embeddings", None) or 2048)
    return {
        "model": {
            "bos_token_id": _token_id(config, "bos_token_id", 0),
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": _token_id(config, "pad_token_id", eos[0] if eos else 0),
            "context_length": context, "vocab_size": config.vocab_size, "type": config.model_type,
            "decoder": {
                "filename": "model.onnx", "head_size": shape.head_dim, "hidden_size": config.hidden_size,
                "num_attention_heads": config.num_attention_heads, "num_hidden_layers": shape.num_layers,
                "num_key_value_heads": shape.num_kv_heads,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "max_length": context, "num_beams": 1, "past_present_share_buffer": False,
                   "temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0},
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)


def save_onnx(model: Any, path: Path, external_data: bool) -> None:
    """Write an ONNX model (weights beside it in one ``.data`` file when ``external_data``), replacing old files."""
    import onnx

    for f in path.parent.glob(path.name + "*"):
        f.unlink()
    if external_data:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data")
    else:
        onnx.save(model, str(path))
