"""Torch engine: continuous batching of decode steps for any transformers causal LM.

A worker thread owns the model. Each iteration it admits waiting requests (a batch-1
prefill each, then their KV rows are padded into the running batch), runs one decode step
for every running sequence at once, and removes finished or cancelled rows. Dense and
factored checkpoints run alike: factored ones are ordinary models whose linears are
FactoredLinear.

With ``compile=True`` a request that arrives when nothing else runs decodes alone through
the runtime's compiled static-cache decoder (:class:`~factorlm.runtime.decode.StaticTorchLM`,
one per power-of-two cache length, so a few shapes get compiled); as soon as a second
request joins, its cache is copied into the dynamic batch and continuous batching goes on
as without ``compile``.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from ..runtime.format import FactorlmError
from ..runtime.decode import StaticTorchLM, TextStream, eos_token_ids, sample_next
from . import batch_cache as bc
from .engine import (EngineDeadError, GenerationRequest, NeverFitsError, QueueFullError, RequestHandle, TokenEvent,
                     TokenLogprob)

log = logging.getLogger(__name__)


@dataclass
class _Seq:
    """Worker-side state of one running request."""

    handle: RequestHandle
    generator: torch.Generator
    stop_ids: set[int]
    text: TextStream
    completion_tokens: int = 0
    cached: int = 0  # real tokens in this row's KV cache
    pending: int = -1  # sampled token not yet fed to the model
    buffer_ids: list[int] = field(default_factory=list)
    buffer_logprobs: list[TokenLogprob] = field(default_factory=list)
    done: bool = False


class TorchEngine:
    """Continuous-batching engine over a transformers model (see module docstring)."""

    supports_logprobs = True

    def __init__(self, model: Any, tokenizer: Any, *, model_name: str = "model", max_batch: int = 16,
                 max_queue: int = 64, max_model_len: int | None = None, compile: bool = False) -> None:
        if max_batch < 1 or max_queue < 0:
            raise FactorlmError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_batch = max_batch
        self.max_queue = max_queue
        limit = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.max_model_len = min(max_model_len, limit) if max_model_len else limit
        self.device = next(model.parameters()).device
        self._eos = eos_token_ids(model, tokenizer)
        self._cond = threading.Condition()
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._running: list[_Seq] = []
        self._admitting = 0  # popped from the queue, being prefilled
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._mask: torch.Tensor | None = None
        self._cache: Any = None
        self.compile = compile
        self._static_lms: dict[int, StaticTorchLM] = {}  # by cache length
        self._static: StaticTorchLM | None = None  # decoding the one running sequence, when set
        self._stop = False
        self._thread: threading.Thread | None = None
        self._dead = False

    # ---- event-loop side -------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request (call from the event loop); QueueFullError when the queue is full."""
        return self.submit_many([request])[0]

    def submit_many(self, requests: list[GenerationRequest]) -> list[RequestHandle]:
        """Queue all of ``requests`` or none (see :meth:`Engine.submit_many`)."""
        import asyncio

        if not self.alive():
            raise EngineDeadError("the engine worker is not running")
        if len(requests) > self.max_batch:
            raise NeverFitsError(f"{len(requests)} sequences in one request, but this server runs at most "
                                 f"{self.max_batch} together (--max-batch)")
        for request in requests:
            total = len(request.prompt_ids) + request.params.max_new_tokens
            if not request.prompt_ids or total > self.max_model_len:
                raise NeverFitsError(f"prompt of {len(request.prompt_ids)} tokens plus "
                                     f"{request.params.max_new_tokens} new tokens does not fit the context of "
                                     f"{self.max_model_len}")
        loop = asyncio.get_running_loop()
        handles = [RequestHandle(request, loop) for request in requests]
        with self._cond:
            free_slots = max(0, self.max_batch - len(self._running) - self._admitting)
            if len(self._waiting) + len(handles) - free_slots > self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._waiting.extend(handles)
            self._cond.notify()
        return handles

    def stats(self) -> dict[str, int]:
        return {"running": len(self._running) + self._admitting, "waiting": len(self._waiting),
                "max_batch": self.max_batch, "max_queue": self.max_queue}

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._dead

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="factorlm-torch-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ---- worker side -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while not self._stop and not self._waiting and not self._running:
                            self._cond.wait()
                        if self._stop:
                            break
                        admitted = []
                        while self._waiting and len(self._running) + len(admitted) < self.max_batch:
                            admitted.append(self._waiting.popleft())
                        self._admitting = len(admitted)
                    try:
                        for handle in admitted:
                            if not handle.cancelled:
                                self._admit(handle)
                            self._admitting -= 1
                        self._drop_finished()
                        if self._running:
                            self._step()
                            self._drop_finished()
                    except Exception as exc:  # a model failure fails the batch, not the server
                        log.exception("engine step failed")
                        self._fail_all(f"generation failed: {type(exc).__name__}: {exc}", admitted)
                        self._admitting = 0
        finally:
            self._dead = True
            self._fail_all("the engine stopped", list(self._waiting))

    def _fail_all(self, message: str, extra: list[RequestHandle]) -> None:
        for seq in self._running:
            seq.handle.push(TokenEvent(error=message))
        for handle in extra:
            handle.push(TokenEvent(error=message))
        self._running, self._layers, self._mask, self._cache, self._static = [], None, None, None, None

    def _static_lm(self, tokens: int) -> StaticTorchLM:
        """The compiled static-cache decoder for ``tokens`` (prompt + new) tokens: the next power of two."""
        length = min(max(64, 1 << tokens.bit_length()), self.max_model_len + 1)
        if length not in self._static_lms:
            self._static_lms[length] = StaticTorchLM(self.model, length, compile=True)
        return self._static_lms[length]

    def _admit_static(self, seq: _Seq, ids: torch.Tensor) -> None:
        """Prefill the only running sequence into a compiled static-cache decoder."""
        lm = self._static_lm(ids.shape[1] + seq.handle.request.params.max_new_tokens)
        logits = lm.prefill(ids)
        seq.cached = ids.shape[1]
        self._accept(seq, logits[0])
        if not seq.done:
            self._static = lm
            self._running.append(seq)

    def _leave_static(self) -> None:
        """Copy the static-cache sequence into the dynamic batch (a second request is joining)."""
        assert self._static is not None
        layers = self._static.kv_prefix()
        self._static = None
        self._layers, self._mask = layers, torch.ones(1, layers[0][0].shape[2], dtype=torch.long, device=self.device)
        self._cache = bc.build_cache(self._layers)

    def _admit(self, handle: RequestHandle) -> None:
        """Prefill one prompt alone, sample its first token and pad its KV rows into the batch."""
        from transformers import DynamicCache

        req = handle.request
        seed = req.params.seed if req.params.seed is not None else random.getrandbits(63)
        seq = _Seq(handle, torch.Generator(device=self.device).manual_seed(seed), req.params.stop_ids(self._eos),
                   TextStream(self.tokenizer, req.params.stop))
        ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.device)
        if self.compile and not self._running and self._admitting == 1:
            return self._admit_static(seq, ids)
        if self._static is not None:
            self._leave_static()
        cache = DynamicCache()
        logits = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        seq.cached = ids.shape[1]
        self._accept(seq, logits[0])
        if seq.done:
            return
        if self._cache is not None:
            self._layers = bc.cache_tensors(self._cache)
        mask = torch.ones(1, ids.shape[1], dtype=torch.long, device=self.device)
        self._layers, self._mask = bc.merge(self._layers, self._mask, bc.cache_tensors(cache), mask)
        self._cache = bc.build_cache(self._layers)
        self._running.append(seq)

    def _step(self) -> None:
        """One decode step for every running sequence."""
        if self._static is not None:
            seq = self._running[0]
            logits = self._static.step(torch.tensor([[seq.pending]], dtype=torch.long, device=self.device))
            seq.cached += 1
            if not seq.handle.cancelled:
                self._accept(seq, logits[0])
            return
        assert self._mask is not None
        ids = torch.tensor([[s.pending] for s in self._running], dtype=torch.long, device=self.device)
        positions = torch.tensor([[s.cached] for s in self._running], dtype=torch.long, device=self.device)
        mask = torch.cat([self._mask, torch.ones(len(self._running), 1, dtype=torch.long, device=self.device)], 1)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=self._cache, use_cache=True)
        self._mask = mask
        logits = out.logits[:, -1]
        for row, seq in enumerate(self._running):
            seq.cached += 1
            if not seq.handle.cancelled:
                self._accept(seq, logits[row])

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self._running) if not s.done and not s.handle.cancelled]
        if len(keep) == len(self._running):
            return
        for seq in self._running:
            if seq.handle.cancelled and not seq.done:
                seq.handle.push(TokenEvent(finish_reason="abort", prompt_tokens=len(seq.handle.request.prompt_ids),
                                           completion_tokens=seq.completion_tokens))
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._layers, self._mask, self._cache, self._static = None, None, None, None
            return
        assert self._mask is not None
        self._layers, self._mask = bc.select(bc.cache_tensors(self._cache), self._mask, keep)
        self._cache = bc.build_cache(self._layers)

    def _accept(self, seq: _Seq, logits: torch.Tensor) -> None:
        """Sample the next token of ``seq`` from its row logits [V]; emit text; decide whether it is done."""
        req = seq.handle.request
        params = req.params
        try:
            token = int(sample_next(logits, params, seq.generator))
        except RuntimeError as exc:  # fail this request only; the rest of the batch goes on
            log.exception("sampling failed for request %d", seq.handle.id)
            seq.handle.push(TokenEvent(error=f"sampling failed: {exc}"))
            seq.done = True
            return
        seq.completion_tokens += 1
        seq.pending = token
        seq.buffer_ids.append(token)
        if req.logprobs is not None:
            lp, best = bc.token_logprobs(logits, token, req.logprobs)
            seq.buffer_logprobs.append(TokenLogprob(token, self._piece(token), lp,
                                                    [(i, self._piece(i), v) for i, v in best]))
        finish: str | None = None
        stop_reason: str | int | None = None
        if token in seq.stop_ids:
            finish = "stop"
            stop_reason = token if token not in self._eos else None
            piece = seq.text.flush()
        else:
            piece = seq.text.push(token)
            if seq.text.stop_string is not None:
                finish, stop_reason = "stop", seq.text.stop_string
            elif seq.completion_tokens >= params.max_new_tokens or seq.cached + 1 >= self.max_model_len:
                finish = "length"
                piece += seq.text.flush()
        if finish is None and not piece:
            return
        self._emit(seq, piece, finish, stop_reason)

    def _emit(self, seq: _Seq, text: str, finish: str | None, stop_reason: str | int | None) -> None:
        seq.handle.push(TokenEvent(text=text, token_ids=seq.buffer_ids, logprobs=seq.buffer_logprobs,
                                   finish_reason=finish, stop_reason=stop_reason,
                                   prompt_tokens=len(seq.handle.request.prompt_ids),
                                   completion_tokens=seq.completion_tokens))
        seq.buffer_ids, seq.buffer_logprobs = [], []
        if finish is not None:
            seq.done = True

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])
