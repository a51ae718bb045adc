"""How ``factorlm serve --engine vllm`` builds vLLM's command line (no vLLM process started)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from factorlm.cli import main
from factorlm.exporters.vllm import server
from factorlm.runtime.format import FactorlmError
from factorlm.testing import write_tiny_factored


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_factored(tmp_path_factory.mktemp("cmd") / "ckpt", "llama",
                               ranks={"model.layers.0.self_attn.q_proj": 8})


@pytest.fixture
def fake_vllm(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(server.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "vllm" else real(name, *a))


def test_binds_localhost_unless_told(checkpoint: Path, fake_vllm) -> None:
    command, _ = server.vllm_server_command(str(checkpoint), ["--port", "9000"])
    assert command[1:5] == ["-m", server.SERVER_MODULE, "--model", str(checkpoint)]
    assert command[command.index("--host") + 1] == "127.0.0.1"
    command, _ = server.vllm_server_command(str(checkpoint), ["--host", "0.0.0.0"])
    assert command.count("--host") == 1 and command[command.index("--host") + 1] == "0.0.0.0"


def test_cpu_build_gets_a_kv_cache_size(checkpoint: Path, fake_vllm, monkeypatch) -> None:
    monkeypatch.setattr(server, "vllm_is_cpu_build", lambda: True)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    _, env = server.vllm_server_command(str(checkpoint))
    assert env["VLLM_CPU_KVCACHE_SPACE"] == server.CPU_KV_CACHE_GIB
    _, env = server.vllm_server_command(str(checkpoint), ["--kv-cache-memory-bytes", "1000"])
    assert "VLLM_CPU_KVCACHE_SPACE" not in env


def test_missing_vllm_is_a_clear_error(checkpoint: Path, monkeypatch) -> None:
    monkeypatch.setattr(server.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FactorlmError, match=r"vLLM is not installed.*factorlm\[vllm\]"):
        server.vllm_server_command(str(checkpoint))


def test_unknown_format_version_fails_before_vllm_starts(checkpoint: Path, fake_vllm, tmp_path: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"]["format_version"] = 7
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FactorlmError, match="unknown factorlm format_version 7"):
        server.vllm_server_command(str(tmp_path))


def test_cli_passes_vllm_arguments_through(checkpoint: Path, monkeypatch) -> None:
    seen = {}

    def launch(path: str, extra: list[str]) -> int:
        seen.update(path=path, extra=extra)
        return 0

    monkeypatch.setattr(server, "launch_vllm_server", launch)
    monkeypatch.setattr("factorlm.exporters.vllm.launch_vllm_server", launch, raising=False)
    assert main(["serve", str(checkpoint), "--engine", "vllm", "--api-key", "k", "--port", "8123",
                 "--tensor-parallel-size", "2", "--enforce-eager"]) == 0
    assert seen["path"] == str(checkpoint)
    extra = seen["extra"]
    assert extra[:4] == ["--host", "127.0.0.1", "--port", "8123"]
    assert extra[extra.index("--api-key") + 1] == "k"
    assert extra[-3:] == ["--tensor-parallel-size", "2", "--enforce-eager"]


def test_other_engines_reject_unknown_arguments(checkpoint: Path, capsys) -> None:
    assert main(["serve", str(checkpoint), "--tensor-parallel-size", "2"]) == 2
    assert "unrecognized arguments for --engine torch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--no-such-flag"])
