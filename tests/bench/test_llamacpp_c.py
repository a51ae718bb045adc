"""The llama.cpp peer through the C API: clear errors without a module; a real run when one is installed."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from factorlm.bench import llamacpp_c
from factorlm.bench.engines import load_llamacpp
from factorlm.bench.runner import BenchConfig, EngineUnavailable

SHIM = Path(__file__).resolve().parents[2] / "benchmarks" / "llamacpp_shim.cc"


def test_module_env_pointing_nowhere_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv(llamacpp_c.MODULE_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(EngineUnavailable, match="FACTORLM_LLAMA_CPP_MODULE=.*missing.so is not a file"):
        llamacpp_c.find_module()


def test_no_installed_module_says_what_to_install(monkeypatch):
    monkeypatch.delenv(llamacpp_c.MODULE_ENV, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EngineUnavailable, match="pip install --no-deps llama-cpp-cffi"):
        llamacpp_c.find_module()


def test_a_file_that_is_not_an_extension_is_refused(tmp_path):
    fake = tmp_path / "_llama_cpp_cpu.so"
    fake.write_bytes(b"not an ELF file")
    with pytest.raises(EngineUnavailable, match="cannot load llama.cpp from _llama_cpp_cpu.so"):
        llamacpp_c.load_module(fake)


def test_bad_preload_library_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv(llamacpp_c.PRELOAD_ENV, str(tmp_path / "nope.so"))
    with pytest.raises(EngineUnavailable, match="FACTORLM_LLAMA_CPP_PRELOAD: cannot load .*nope.so"):
        llamacpp_c.load_module(tmp_path / "whatever.so")


def test_llamacpp_is_cpu_only(tmp_path):
    with pytest.raises(EngineUnavailable, match="CPU only"):
        load_llamacpp(tmp_path / "m.gguf", "gguf-q4_1", BenchConfig(device="cuda"))


@pytest.fixture(scope="module")
def c_module_env(tmp_path_factory):
    """Environment under which the installed llama.cpp C module loads (building the shim if it must)."""
    try:
        path = llamacpp_c.find_module()
    except EngineUnavailable as exc:
        pytest.skip(str(exc))
    probe = "from factorlm.bench import llamacpp_c as m; m.load_module(m.find_module())"
    env = dict(os.environ)
    if subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode != 0:
        if shutil.which("g++") is None:
            pytest.skip(f"{path.name} does not load here and there is no g++ to build the shim")
        shim = tmp_path_factory.mktemp("shim") / "libcxa_shim.so"
        subprocess.run(["g++", "-O2", "-shared", "-fPIC", "-o", str(shim), str(SHIM)], check=True)
        env[llamacpp_c.PRELOAD_ENV] = str(shim)
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"{path.name} does not load even with the shim: {done.stderr[-300:]}")
    return env


def test_sample_gguf_runs_greedy_and_repeatably(c_module_env):
    """Two runs of one prompt give the same tokens (no prefix reuse) and positive timings."""
    code = """
import json
from factorlm.bench.engines import load_llamacpp
from factorlm.bench.runner import BenchConfig
from factorlm.sample_model import find_gguf
r = load_llamacpp(find_gguf(), "gguf-q4_1", BenchConfig(prompt_tokens=12, new_tokens=6))
prompt = [[1, 504, 3458, 282, 4649, 314, 253, 1789, 30, 378, 3458, 314]]
a = r.run(prompt, 6); first = r.last_tokens
b = r.run(prompt, 6)
print(json.dumps({"backend": r.backend, "first": first, "second": r.last_tokens, "n_vocab": r._n_vocab,
                  "times": [a.ttft_s, a.decode_s, b.ttft_s, b.decode_s], "bytes": r.file_weight_bytes}))
r.close()
"""
    try:
        from factorlm.sample_model import find_gguf

        find_gguf()
    except Exception as exc:  # the sample wheel is a data dependency of the test setup
        pytest.skip(f"sample GGUF not installed: {exc}")
    done = subprocess.run([sys.executable, "-c", code], env=c_module_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["backend"].startswith("llama.cpp C API")
    assert out["first"] == out["second"] and len(out["first"][0]) == 6
    assert all(0 <= t < out["n_vocab"] for t in out["first"][0])
    assert all(t > 0 for t in out["times"]) and out["bytes"] > 50e6
