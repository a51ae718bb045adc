"""A live OpenAI-compatible server over a tiny model on 127.0.0.1 (random free port), shared per module."""

from __future__ import annotations

import pytest

from factorlm.serving.app import create_app
from factorlm.serving.server import BackgroundServer
from factorlm.serving.torch_engine import TorchEngine
from factorlm.testing import make_tiny_model

MODEL = "tiny"


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def live(tiny):
    """(url, engine, app) of a running server."""
    model, tokenizer = tiny
    engine = TorchEngine(model, tokenizer, model_name=MODEL, max_batch=16, max_queue=32)
    app = create_app(engine, max_tokens_limit=200)
    with BackgroundServer(app) as url:
        yield url, engine, app
