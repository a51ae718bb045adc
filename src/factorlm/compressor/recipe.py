"""Compression recipes as data: the dataclass, its YAML form, and strict validation.

A recipe holds everything that decides a checkpoint's tensors: method, allocation, budget,
calibration (source, windows, length, seed), correctors, healing steps, device and dtype.
Every checkpoint carries one (``factorlm_recipe.yaml``), and ``factorlm compress MODEL
--recipe FILE`` replays it: the same recipe on the same model gives the same tensors.

This module imports no torch, so the CLI can check a recipe file before any model loads:
an unknown key or a wrong type names the key and the file, and a recipe written by a newer
``format_version`` is refused.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..runtime.format import FactorlmError

RECIPE_FORMAT_VERSION = 1
RECIPE_FILE = "factorlm_recipe.yaml"  # beside every checkpoint's weights
REPORT_FILE = "factorlm_report.json"
WIKITEXT_MARKERS = ("wikitext", "wiki.test", "wiki.train", "wiki.valid")

_NONE = type(None)
# the fields of compressor.corrector_pass.CorrectorConfig (tests keep the two equal)
CORRECTOR_FIELDS: dict[str, tuple[type, ...]] = {
    "rank": (int, _NONE), "fraction": (float,), "layer_steps": (int,), "block_steps": (int,),
    "distill_steps": (int,), "lr": (float,), "distill_lr": (float,), "train": (str,), "save": (str,),
    "multiple": (int,), "max_rank": (int,), "seed": (int,), "init": (str,),
}
# the fields of compressor.finetune.FinetuneConfig a recipe may set (cache, checkpointing, device and parallel mode
# are run settings, not recipe), plus ``calib``: the training text (None: the recipe's calibration source)
HEAL_FIELDS: dict[str, tuple[type, ...]] = {
    "steps": (int,), "lr": (float,), "warmup": (int, _NONE), "samples": (int, _NONE), "seq_len": (int,),
    "held_out": (int,), "clip": (float,), "train": (str,), "seed": (int,), "batch_size": (int,),
    "grad_accum": (int,), "top_k": (int, _NONE), "bf16": (bool,), "calib": (str, _NONE),
}


@dataclass
class CompressionRecipe:
    """What the user asked for; saved beside the checkpoint so a run can be repeated bit for bit.

    Exactly one of ``keep`` (linear params kept) and ``reduction`` (whole-model params
    removed) is used; ``reduction`` wins when both are set by code, the CLI forbids it.
    ``calib`` is a file, ``sample`` or ``hf:NAME[:CONFIG[:SPLIT]]``; ``None`` picks ``sample``
    when a method or allocator needs calibration. ``beta`` fixes saes' β (None: ACES per layer, by
    the ``aces`` criterion: ``holdout`` or the paper's ``energy``; see ``methods.MethodOptions``).
    ``dtype`` is the checkpoint dtype (None: the source's; the saved recipe records the one used).
    ``corrector`` (fields of ``CorrectorConfig``) adds trained correctors; ``heal`` (fields of
    ``FinetuneConfig`` plus ``calib``) distils the compressed model end to end afterwards.
    """

    format_version: int = RECIPE_FORMAT_VERSION
    method: str = "svd"
    keep: float | None = 0.6
    reduction: float | None = None
    allocation: str = "uniform"
    rank_multiple: int = 8
    min_rank: int | None = None
    source: str = ""
    calib: str | None = None
    calib_samples: int = 32
    calib_len: int = 512
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 4
    beta: float | None = None
    aces: str = "holdout"
    damping: float = 1e-6
    sequential: bool = True
    dtype: str | None = None
    corrector: dict[str, Any] | None = None
    heal: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False)

    def calibration_source(self) -> str | None:
        """The calibration source (older recipes kept it under ``extra``)."""
        return self.calib or self.extra.get("calib")

    def heal_source(self) -> str | None:
        """The text healing trains on: ``heal.calib``, else the calibration source."""
        if not self.heal:
            return None
        return self.heal.get("calib") or self.calibration_source()


FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "format_version": (int,), "method": (str,), "keep": (float, _NONE), "reduction": (float, _NONE),
    "allocation": (str,), "rank_multiple": (int,), "min_rank": (int, _NONE), "source": (str,),
    "calib": (str, _NONE), "calib_samples": (int,), "calib_len": (int,), "seed": (int,), "device": (str,),
    "batch_size": (int,), "beta": (float, _NONE), "aces": (str,), "damping": (float,), "sequential": (bool,),
    "dtype": (str, _NONE), "corrector": (dict, _NONE), "heal": (dict, _NONE), "extra": (dict,),
}
DTYPE_NAMES = ("bf16", "fp16", "fp32")


def _type_ok(value: Any, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # bool is an int in Python; only a bool field takes one
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    return isinstance(value, allowed)


def _type_names(allowed: tuple[type, ...]) -> str:
    return " or ".join("null" if t is _NONE else t.__name__ for t in allowed)


def _check_fields(data: dict[str, Any], schema: dict[str, tuple[type, ...]], where: str, prefix: str = "") -> None:
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in schema:
            raise FactorlmError(f"{where}: unknown recipe key {name!r} (known: {', '.join(schema)})")
        if not _type_ok(value, schema[key]):
            raise FactorlmError(f"{where}: recipe key {name!r} must be {_type_names(schema[key])}, "
                                f"got {type(value).__name__} {value!r}")


def _check_values(r: CompressionRecipe, where: str) -> None:
    """Ranges the types alone do not catch, named like the CLI flags they mirror."""
    def bad(key: str, why: str) -> FactorlmError:
        return FactorlmError(f"{where}: recipe key {key!r} {why}")

    if r.keep is None and r.reduction is None:
        raise bad("keep", "and 'reduction' are both null; give one budget")
    if r.keep is not None and not (math.isfinite(r.keep) and 0 < r.keep <= 1):
        raise bad("keep", f"must be in (0, 1], got {r.keep!r}")
    if r.reduction is not None and not (math.isfinite(r.reduction) and 0 <= r.reduction < 1):
        raise bad("reduction", f"must be in [0, 1), got {r.reduction!r}")
    for key in ("rank_multiple", "calib_samples", "batch_size"):
        if getattr(r, key) < 1:
            raise bad(key, f"must be >= 1, got {getattr(r, key)!r}")
    if r.min_rank is not None and r.min_rank < 1:
        raise bad("min_rank", f"must be >= 1, got {r.min_rank!r}")
    if r.calib_len < 2:
        raise bad("calib_len", f"must be >= 2, got {r.calib_len!r}")
    if r.beta is not None and not 0 <= r.beta <= 1:
        raise bad("beta", f"must be in [0, 1], got {r.beta!r}")
    if r.aces not in ("holdout", "energy"):
        raise bad("aces", f"must be 'holdout' or 'energy', got {r.aces!r}")
    if r.dtype is not None and r.dtype not in DTYPE_NAMES:
        raise bad("dtype", f"must be one of {', '.join(DTYPE_NAMES)} or null, got {r.dtype!r}")
    for key, text in (("calib", r.calibration_source()), ("heal.calib", (r.heal or {}).get("calib"))):
        if text and any(m in str(text).lower() for m in WIKITEXT_MARKERS):
            raise bad(key, f"points at WikiText-2 ({text!r}), the evaluation text; calibrate on other text")


def recipe_from_dict(data: Any, where: str = "recipe") -> CompressionRecipe:
    """A validated recipe from parsed YAML; ``where`` (the file) is named in every error.

    Refuses a ``format_version`` newer than this factorlm reads; a recipe without one is a
    version-1 recipe from before the field existed (its ``extra.corrector`` moves to ``corrector``).
    """
    if not isinstance(data, dict):
        raise FactorlmError(f"{where}: a recipe must be a YAML mapping of keys to values, got {type(data).__name__}")
    data = dict(data)
    version = data.get("format_version", 1)
    if isinstance(version, int) and not isinstance(version, bool) and version > RECIPE_FORMAT_VERSION:
        raise FactorlmError(f"{where}: recipe format_version {version} is newer than this factorlm reads "
                            f"(up to {RECIPE_FORMAT_VERSION}); upgrade factorlm to use it")
    _check_fields(data, FIELD_TYPES, where)
    if isinstance(version, int) and version < 1:
        raise FactorlmError(f"{where}: recipe key 'format_version' must be >= 1, got {version}")
    extra = dict(data.get("extra") or {})
    if "corrector" in extra and data.get("corrector") is None:
        data["corrector"] = extra.pop("corrector")
    data["extra"] = extra
    for key, schema in (("corrector", CORRECTOR_FIELDS), ("heal", HEAL_FIELDS)):
        if data.get(key) is not None:
            _check_fields(data[key], schema, where, prefix=f"{key}.")
    for key in ("keep", "reduction", "beta", "damping"):  # YAML may write 1 for 1.0
        if isinstance(data.get(key), int):
            data[key] = float(data[key])
    data["format_version"] = RECIPE_FORMAT_VERSION
    recipe = CompressionRecipe(**data)
    _check_values(recipe, where)
    return recipe


def load_recipe(path: str | Path) -> CompressionRecipe:
    """Read and validate a recipe file (safe YAML only); errors name the file and the key."""
    p = Path(path)
    if not p.is_file():
        raise FactorlmError(f"{p}: recipe file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise FactorlmError(f"{p}: not valid YAML: {exc}") from None
    return recipe_from_dict(data, str(p))


def recipe_keys() -> list[str]:
    """Top-level recipe keys, in file order."""
    return [f.name for f in fields(CompressionRecipe)]


__all__ = ["CORRECTOR_FIELDS", "HEAL_FIELDS", "RECIPE_FILE", "RECIPE_FORMAT_VERSION", "REPORT_FILE", "CompressionRecipe", "load_recipe",
           "recipe_from_dict", "recipe_keys"]
