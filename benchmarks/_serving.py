"""Shared by the server reliability scripts: a model folder per engine, and `factorlm serve` in its own process.

The server always runs as the real CLI (``python -m factorlm serve ...``) with an API key
and a served model name, so what the scripts measure is what users run. ONNX exports of
a model folder are made once with ``factorlm export onnx`` and cached under
``~/.cache/factorlm/bench-onnx/`` (the same cache the offline benchmarks use).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def model_folder(spec: str, workdir: Path) -> tuple[Path, str]:
    """(folder, label) for ``tiny`` (a tiny in-code llama saved to ``workdir``), ``sample`` or a folder."""
    if spec == "tiny":
        from factorlm.testing import save_tiny_dense

        return save_tiny_dense(workdir / "tiny"), "tiny llama (2 layers, hidden 64)"
    if spec == "sample":
        from factorlm.sample_model import materialize_sample_model

        path = materialize_sample_model()
        return path, f"sample model {path.name} (fp32)"
    path = Path(spec)
    return path, path.name


def onnx_export(folder: Path, workdir: Path, threads: int) -> Path:
    """An ONNX export of ``folder``: itself if it is one, else exported once (``factorlm export onnx``) and cached."""
    if (folder / "factorlm_onnx.json").is_file():
        return folder
    from factorlm.bench.engines import export_cache_dir, folder_fingerprint

    temporary = str(folder).startswith(str(workdir))
    out = workdir / f"{folder.name}-{folder_fingerprint(folder)}" if temporary else export_cache_dir(folder)
    if not (out / "factorlm_onnx.json").is_file():
        print(f"exporting {display(folder)} to ONNX at {display(out)} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "factorlm", "export", "onnx", str(folder), "-o", str(out),
                        "--overwrite", "--threads", str(threads)], check=True)
    return out


def display(path: str | Path) -> str:
    """A path for result files: the home folder as ``~``."""
    text, home = str(path), str(Path.home())
    return "~" + text[len(home):] if text.startswith(home + os.sep) else text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def environment() -> dict[str, Any]:
    """What the numbers depend on: CPU count, this process's niceness (the servers inherit it), load."""
    return {"cpus": os.cpu_count(), "niceness": os.nice(0), "loadavg_start": loadavg()}


def environment_line(env: dict[str, Any]) -> str:
    return (f"Machine: {env['cpus']} CPU cores, shared with other jobs; clients and servers at niceness "
            f"{env['niceness']}; load average (1, 5, 15 min) at start {env['loadavg_start']}.")


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of ``pid`` from /proc: ``VmRSS`` (all), ``RssAnon`` (heap: what a leak grows) or ``RssFile``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Server:
    url: str
    pid: int
    key: str
    model: str
    command: str  # the serve command, with the machine's paths and the key left out

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def metric_sum(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` in /metrics whose labels include ``labels`` (a value "5*" matches 5xx)."""
        import httpx

        total = 0.0
        for line in httpx.get(f"{self.url}/metrics", timeout=30).text.splitlines():
            if not line.startswith(name + "{"):
                continue
            if all((f'{k}="{v[:-1]}' if v.endswith("*") else f'{k}="{v}"') in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


@contextlib.contextmanager
def serve(folder: Path, engine: str, *, threads: int = 1, extra: list[str] | None = None,
          model: str = "served-model", startup_s: float = 600, length_guard: bool = True) -> Iterator[Server]:
    """Run ``factorlm serve`` on a free port with an API key; yield once /health answers, stop on exit.

    ``length_guard=False`` runs the same server through :func:`serve_without_length_guard` instead, so
    that every prompt is tokenized (to measure what tokenizing a huge prompt costs).
    """
    import httpx

    if threading.current_thread() is threading.main_thread():  # a killed run still stops its server
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    port, key = free_port(), secrets.token_hex(8)
    args = ["--engine", engine, "--served-model-name", model, "--threads", str(threads), *(extra or [])]
    launcher = [sys.executable, "-m", "factorlm", "serve"] if length_guard else [sys.executable, __file__]
    shown = "factorlm serve" if length_guard else "python benchmarks/_serving.py (factorlm serve, length guard off)"
    with tempfile.NamedTemporaryFile("w+b", prefix="factorlm-serve-", suffix=".log") as log:
        process = subprocess.Popen([*launcher, str(folder), *args, "--port", str(port), "--api-key", key],
                                   stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + startup_s
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    raise SystemExit(f"the server exited during start-up:\n{log.read().decode()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit(f"the server did not become healthy in {startup_s:.0f} s")
                time.sleep(0.2)
            command = f"{shown} {display(folder)} {' '.join(args)} --api-key KEY"
            yield Server(f"http://127.0.0.1:{port}", process.pid, key, model, command)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.seek(0)
            tail = log.read().decode(errors="replace").strip()
            if tail:
                print(f"--- server log ({engine}), last lines ---\n{tail[-2000:]}", file=sys.stderr)


def write_result(out: Path, result: dict[str, Any], markdown: str) -> None:
    """``out``.json and ``out``.md, each written atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=2) + "\n"), (".md", markdown)):
        tmp = out.with_name(out.name + suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(out.with_name(out.name + suffix))


def serve_without_length_guard(argv: list[str]) -> int:
    """``factorlm serve`` with the same flags, except that the app tokenizes every prompt (no length guard)."""
    import argparse

    from factorlm.cli import serve as cli_serve
    from factorlm.serving.app import create_app
    from factorlm.serving.engines import EngineOptions, create_engine
    from factorlm.serving.limits import MIB, HttpLimits
    from factorlm.serving.server import uvicorn_server

    parser = argparse.ArgumentParser()
    cli_serve.register(parser.add_subparsers())
    args = parser.parse_args(["serve", *argv])
    limits = HttpLimits(max_body_bytes=int(args.max_body_mib * MIB), body_timeout_s=args.body_timeout,
                        header_timeout_s=args.header_timeout, keep_alive_timeout_s=args.keep_alive_timeout)
    options = EngineOptions(max_batch=args.max_batch, max_queue=args.max_queue, max_model_len=args.max_model_len,
                            served_model_name=args.served_model_name, threads=args.threads)
    engine = create_engine(args.engine, Path(args.model), options)
    app = create_app(engine, api_key=args.api_key, max_tokens_limit=args.max_tokens_limit, limits=limits,
                     length_guard=False)
    uvicorn_server(app, args.host, args.port).run()
    return 0


if __name__ == "__main__":
    sys.exit(serve_without_length_guard(sys.argv[1:]))
