"""The factored checkpoint format: the `quantization_config` block and tensor naming.

This module is the single source of truth for what a factorlm checkpoint looks like. It
imports no other factorlm module (and nothing heavier than the standard library), so the
vLLM plugin, the ONNX exporter and the transformers quantizer can all read a checkpoint
without pulling in the compressor.

A checkpoint is an ordinary Hugging Face model folder whose ``config.json`` carries::

    "quantization_config": {
        "quant_method": "factorlm", "format_version": 1,
        "ranks": {"model.layers.0.self_attn.q_proj": 192, ...},
        "dense": ["model.layers.0.self_attn.k_proj", ...],
        "correctors": "folded", "factor_dtype": "float32",
        "producer": {"name": "factorlm", "version": "0.1.0"}
    }

and whose safetensors hold ``<fqn>.weight_u`` [out, r] and ``<fqn>.weight_v`` [r, in] for
every module in ``ranks``; every other module keeps its usual ``<fqn>.weight``.

Correctors are normally folded into the factors (``"correctors": "folded"``). A checkpoint
saved for further training keeps them apart (``"correctors": "separate"``): the block then
also lists ``"corrector_ranks": {fqn: c}`` and the files hold ``<fqn>.corrector_a`` [c, in]
and ``<fqn>.corrector_b`` [out, c] beside that module's factors.

Format version 2 adds quantized weights (written only for quantized checkpoints; an
unquantized checkpoint stays version 1, so older readers keep reading it). The block then
also carries ``"bits": 8 | 4``, ``"group_size"`` (int4 only, along the input dimension),
``"rounding": "rtn" | "gptq"`` and ``"quantized_dense": [fqn, ...]`` (dense modules
quantized too), and each factor or dense weight ``<fqn>.<w>`` (``w`` in ``weight_u``,
``weight_v``, ``weight``) is stored as ``<fqn>.<w>_qweight`` (int8 [out, in], or int4 codes
packed two per uint8 [out, in / 2]) and ``<fqn>.<w>_scales`` (float32 [out] for int8,
[out, in / group_size] for int4). Every factored module is quantized; the math is in
:mod:`.quant`.

Format version 3 adds quantized input embeddings: ``"quantized_embeddings": [fqn, ...]``
(usually ``["model.embed_tokens"]``), each stored as ``<fqn>.weight_qweight`` (int8 [vocab,
hidden]) and ``<fqn>.weight_scales`` (float32 [vocab], one scale per row) whatever ``bits``
says: a lookup reads one row per token, so int4 would save little time and cost the most
accuracy. Only an untied embedding can be quantized this way. A checkpoint without quantized
embeddings stays version 2 (or 1), so older readers keep reading it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUANT_METHOD = "factorlm"
FORMAT_VERSION = 1
QUANTIZED_FORMAT_VERSION = 2
EMBEDDINGS_FORMAT_VERSION = 3
SUPPORTED_FORMAT_VERSIONS = (1, 2, 3)
QUANT_BITS = (4, 8)
ROUNDINGS = ("rtn", "gptq")
QWEIGHT_SUFFIX = "_qweight"
SCALES_SUFFIX = "_scales"
CORRECTOR_MODES = ("folded", "separate", "none")

U_SUFFIX = "weight_u"
V_SUFFIX = "weight_v"
CORRECTOR_A_SUFFIX = "corrector_a"
CORRECTOR_B_SUFFIX = "corrector_b"


class FactorlmError(Exception):
    """Base class of every error factorlm raises on purpose (bad input, bad checkpoint)."""


class FormatError(FactorlmError, ValueError):
    """A checkpoint or config block that does not follow the factored format."""


def u_key(fqn: str) -> str:
    """Name of the left factor U [out, r] of module ``fqn`` in the safetensors file."""
    return f"{fqn}.{U_SUFFIX}"


def v_key(fqn: str) -> str:
    """Name of the right factor V [r, in] of module ``fqn`` in the safetensors file."""
    return f"{fqn}.{V_SUFFIX}"


def qweight_key(fqn: str, part: str) -> str:
    """Stored integer codes of weight ``part`` (``weight_u``, ``weight_v`` or ``weight``) of ``fqn`` (version 2)."""
    return f"{fqn}.{part}{QWEIGHT_SUFFIX}"


def scales_key(fqn: str, part: str) -> str:
    """Floating-point scales of weight ``part`` of module ``fqn`` (version 2)."""
    return f"{fqn}.{part}{SCALES_SUFFIX}"


@dataclass
class FactoredConfig:
    """The ``quantization_config`` block of a factored checkpoint.

    ``ranks`` lists every factored module explicitly (readers such as vLLM must know each
    rank before any tensor is read); ``dense`` lists the modules that were considered and
    kept dense on purpose (break-even or allocator choice).
    """

    ranks: dict[str, int]
    dense: list[str] = field(default_factory=list)
    correctors: str = "folded"
    factor_dtype: str = "float32"
    producer: dict[str, str] = field(default_factory=dict)
    format_version: int | None = None  # None: 2 when quantized, else 1
    corrector_ranks: dict[str, int] = field(default_factory=dict)
    bits: int | None = None
    group_size: int | None = None
    rounding: str | None = None
    quantized_dense: list[str] = field(default_factory=list)
    quantized_embeddings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.format_version is None:
            self.format_version = (EMBEDDINGS_FORMAT_VERSION if self.quantized_embeddings else
                                   QUANTIZED_FORMAT_VERSION if self.bits is not None else FORMAT_VERSION)
        validate_block_fields(self.ranks, self.dense, self.correctors, self.format_version)
        validate_corrector_ranks(self.ranks, self.correctors, self.corrector_ranks)
        validate_quant_fields(self)

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready block, with ``quant_method`` first so readers dispatch on it."""
        block = {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "ranks": dict(self.ranks),
            "dense": list(self.dense),
            "correctors": self.correctors,
            "factor_dtype": self.factor_dtype,
            "producer": dict(self.producer),
        }
        if self.corrector_ranks:
            block["corrector_ranks"] = dict(self.corrector_ranks)
        if self.quantized:
            block.update(bits=self.bits, group_size=self.group_size, rounding=self.rounding or "rtn",
                         quantized_dense=list(self.quantized_dense))
        if self.quantized_embeddings:
            block["quantized_embeddings"] = list(self.quantized_embeddings)
        return block

    @classmethod
    def from_dict(cls, block: dict[str, Any], source: str = "quantization_config") -> "FactoredConfig":
        """Parse and validate a block; ``source`` names the file in error messages."""
        if not isinstance(block, dict):
            raise FormatError(f"{source}: quantization_config must be a JSON object, got {type(block).__name__}")
        method = block.get("quant_method")
        if method != QUANT_METHOD:
            raise FormatError(f"{source}: quant_method is {method!r}, expected {QUANT_METHOD!r}")
        version = block.get("format_version")
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise FormatError(
                f"{source}: unknown factorlm format_version {version!r}; this factorlm reads "
                f"format_version {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}. "
                "Upgrade factorlm or re-export the checkpoint."
            )
        if "ranks" not in block:
            raise FormatError(f"{source}: quantization_config has no 'ranks' field")
        try:
            return cls(
                ranks={str(k): v for k, v in block["ranks"].items()},
                dense=list(block.get("dense", [])),
                correctors=block.get("correctors", "folded"),
                factor_dtype=block.get("factor_dtype", "float32"),
                producer=dict(block.get("producer", {})),
                format_version=version,
                corrector_ranks={str(k): v for k, v in block.get("corrector_ranks", {}).items()},
                bits=block.get("bits"),
                group_size=block.get("group_size"),
                rounding=block.get("rounding"),
                quantized_dense=list(block.get("quantized_dense", [])),
                quantized_embeddings=list(block.get("quantized_embeddings", [])),
            )
        except (AttributeError, TypeError) as exc:
            raise FormatError(f"{source}: malformed quantization_config: {exc}") from exc
        except FormatError as exc:
            raise FormatError(f"{source}: {exc}") from None


def validate_block_fields(ranks: Any, dense: Any, correctors: str, version: int) -> None:
    """Check field types and values; raise FormatError naming the offending field/module."""
    if not isinstance(ranks, dict):
        raise FormatError("field 'ranks' must map module names to integer ranks")
    for name, rank in ranks.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise FormatError(f"field 'ranks': module {name!r} has invalid rank {rank!r} (need an integer >= 1)")
    if not isinstance(dense, list) or not all(isinstance(d, str) for d in dense):
        raise FormatError("field 'dense' must be a list of module names")
    overlap = sorted(set(ranks) & set(dense))
    if overlap:
        raise FormatError(f"modules listed both in 'ranks' and 'dense': {overlap[:5]}")
    if correctors not in CORRECTOR_MODES:
        raise FormatError(f"field 'correctors' is {correctors!r}; expected one of {CORRECTOR_MODES}")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise FormatError(f"unknown factorlm format_version {version!r}")


def validate_quant_fields(block: "FactoredConfig") -> None:
    """Version-2/3 fields: present exactly when quantized, with valid bits/group size/rounding."""
    qe = block.quantized_embeddings
    if not isinstance(qe, list) or not all(isinstance(e, str) for e in qe):
        raise FormatError("field 'quantized_embeddings' must be a list of module names")
    if block.bits is None:
        if block.format_version in (QUANTIZED_FORMAT_VERSION, EMBEDDINGS_FORMAT_VERSION):
            raise FormatError(f"format_version {block.format_version} (quantized) but field 'bits' is missing")
        if block.group_size is not None or block.quantized_dense or block.rounding is not None or qe:
            raise FormatError("fields 'group_size'/'quantized_dense'/'quantized_embeddings'/'rounding' need 'bits' "
                              "(a quantized checkpoint)")
        return
    want = EMBEDDINGS_FORMAT_VERSION if qe else QUANTIZED_FORMAT_VERSION
    if block.format_version != want:
        what = "field 'quantized_embeddings'" if qe else "field 'bits' without 'quantized_embeddings'"
        raise FormatError(f"{what} needs format_version {want}, got {block.format_version}")
    if isinstance(block.bits, bool) or block.bits not in QUANT_BITS:
        raise FormatError(f"field 'bits' is {block.bits!r}; expected 4 or 8")
    g = block.group_size
    if block.bits == 8 and g is not None:
        raise FormatError(f"field 'group_size' is {g!r}; int8 is per output channel (group_size null)")
    if block.bits == 4 and (isinstance(g, bool) or not isinstance(g, int) or g < 2 or g % 2):
        raise FormatError(f"field 'group_size' is {g!r}; int4 needs an even integer >= 2")
    if block.rounding not in (None, *ROUNDINGS):
        raise FormatError(f"field 'rounding' is {block.rounding!r}; expected one of {ROUNDINGS}")
    if block.correctors == "separate":
        raise FormatError("a quantized checkpoint cannot keep separate correctors; fold them first")
    qd = block.quantized_dense
    if not isinstance(qd, list) or not all(isinstance(d, str) for d in qd):
        raise FormatError("field 'quantized_dense' must be a list of module names")
    overlap = sorted(set(qd) & set(block.ranks))
    if overlap:
        raise FormatError(f"modules listed both in 'ranks' and 'quantized_dense': {overlap[:5]}")
    overlap = sorted(set(qe) & (set(block.ranks) | set(qd) | set(block.dense)))
    if overlap:
        raise FormatError(f"modules listed in 'quantized_embeddings' and as linear layers: {overlap[:5]}")


def validate_corrector_ranks(ranks: dict[str, int], correctors: str, corrector_ranks: Any) -> None:
    """``corrector_ranks`` is required with separate correctors, forbidden otherwise, and names factored modules."""
    if not isinstance(corrector_ranks, dict):
        raise FormatError("field 'corrector_ranks' must map module names to integer corrector ranks")
    if correctors == "separate" and not corrector_ranks:
        raise FormatError("field 'correctors' is 'separate' but 'corrector_ranks' is missing or empty")
    if correctors != "separate" and corrector_ranks:
        raise FormatError(f"field 'corrector_ranks' is given but 'correctors' is {correctors!r}, not 'separate'")
    for name, rank in corrector_ranks.items():
        if name not in ranks:
            raise FormatError(f"field 'corrector_ranks': module {name!r} is not listed in 'ranks'")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise FormatError(f"field 'corrector_ranks': module {name!r} has invalid rank {rank!r} (need an integer >= 1)")


def corrector_a_key(fqn: str) -> str:
    """Name of corrector A [c, in] of module ``fqn`` (separate correctors only)."""
    return f"{fqn}.{CORRECTOR_A_SUFFIX}"


def corrector_b_key(fqn: str) -> str:
    """Name of corrector B [out, c] of module ``fqn`` (separate correctors only)."""
    return f"{fqn}.{CORRECTOR_B_SUFFIX}"


def is_factored_block(block: Any) -> bool:
    """True when a quantization_config dict claims to be a factorlm block (any version)."""
    return isinstance(block, dict) and block.get("quant_method") == QUANT_METHOD


def read_config_json(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``config.json`` of a model folder with errors that name the file."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FactorlmError(f"{path}: not found (is {model_dir} a model folder?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: invalid JSON: {exc}") from exc


def read_factored_config(model_dir: str | os.PathLike) -> FactoredConfig | None:
    """The factored block of a model folder, or None for an ordinary dense folder."""
    config = read_config_json(model_dir)
    block = config.get("quantization_config")
    if not is_factored_block(block):
        return None
    return FactoredConfig.from_dict(block, source=str(Path(model_dir) / "config.json"))
