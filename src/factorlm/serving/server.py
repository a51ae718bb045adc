"""Building an engine for a model folder and running the app under uvicorn."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from ..runtime.format import FactorlmError

log = logging.getLogger(__name__)


def torch_engine(model_dir: str | Path, *, max_batch: int = 16, max_queue: int = 64,
                 max_model_len: int | None = None, served_model_name: str | None = None) -> Any:
    """A TorchEngine over a dense or factored checkpoint folder."""
    from ..runtime.checkpoint import load_model, load_tokenizer
    from .torch_engine import TorchEngine

    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    name = served_model_name or Path(model_dir).name
    return TorchEngine(model, tokenizer, model_name=name, max_batch=max_batch, max_queue=max_queue,
                       max_model_len=max_model_len)


def uvicorn_server(app: Any, host: str = "127.0.0.1", port: int = 8000) -> Any:
    """A uvicorn.Server for ``app`` (no access log: the metrics endpoint counts requests)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


class BackgroundServer:
    """Run an app on 127.0.0.1 in a thread (tests, benchmarks): ``with BackgroundServer(app) as url: ...``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.server = uvicorn_server(app, host, port)
        self.thread = threading.Thread(target=self.server.run, name="factorlm-uvicorn", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise FactorlmError(f"the server at {self.url} did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
