"""Block-wise streaming primitives: capture a block's inputs, run one block, gather statistics.

The compressor never runs the whole model on its calibration data. It captures the input
hidden states of decoder block 0 (and the keyword arguments every block receives: position
embeddings, attention mask, ...), then walks the blocks one at a time, so memory is bounded
by one block plus its activations. Activations live on the CPU between blocks; the block in
work and its activations go to ``device``.

Architecture access goes through :mod:`factorlm.runtime.arch` only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..runtime.arch import decoder_layers, get_arch
from ..runtime.format import FactorlmError
from .methods import InputStats

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised inside the last block's stub to end the capture forward early."""


@dataclass
class CapturedInputs:
    """Block-0 input hidden states (one CPU tensor per batch) and each block's keyword arguments."""

    hidden: list[torch.Tensor]
    block_kwargs: list[dict[str, Any]]


def to_device(value: Any, device: torch.device | str) -> Any:
    """Move tensors inside nested tuples/lists/dicts to ``device`` (other values unchanged)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def split_batches(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Rows of ``ids`` in equal-size batches (the largest divisor of the row count ≤ ``batch_size``).

    Equal sizes let every batch share the keyword arguments captured once (masks are shaped
    by the batch size).
    """
    n = ids.shape[0]
    size = max(d for d in range(1, max(1, min(batch_size, n)) + 1) if n % d == 0)
    return list(ids.split(size))


@torch.no_grad()
def capture_block_inputs(model: nn.Module, batches: Sequence[torch.Tensor]) -> CapturedInputs:
    """Inputs of block 0 for every batch, and the kwargs each block is called with.

    Every block's ``forward`` is temporarily replaced by a stub that records its arguments and
    returns its input unchanged; the last block's stub stops the forward, so the capture costs
    only the embeddings, the rotary tables and the masks. Per-block kwargs matter for families
    whose blocks differ (e.g. sliding-window and full-attention layers).
    """
    layers = decoder_layers(model)
    hidden: list[torch.Tensor] = []
    kwargs_of: list[dict[str, Any] | None] = [None] * len(layers)
    last = len(layers) - 1

    def stub(index: int):  # noqa: ANN202 - a forward replacement
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            if args:
                states, rest = args[0], args[1:]
            else:
                states, rest = kwargs.pop("hidden_states"), ()
            if rest:
                raise FactorlmError(f"decoder block {index} got {len(rest)} extra positional arguments; "
                                    "the streaming compressor expects keyword arguments")
            if kwargs_of[index] is None:
                kwargs_of[index] = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
            if index == 0:
                hidden.append(states.detach().to("cpu"))
            if index == last:
                raise _StopForward
            return states
        return forward

    embed_device = model.get_input_embeddings().weight.device
    for index, block in enumerate(layers):
        block.forward = stub(index)  # type: ignore[method-assign]
    try:
        for batch in batches:
            with contextlib.suppress(_StopForward):
                model(input_ids=batch.to(embed_device), use_cache=False)
    finally:
        for block in layers:
            del block.forward
    if any(k is None for k in kwargs_of) or len(hidden) != len(batches):
        raise FactorlmError("could not capture the decoder blocks' inputs (a block was not called)")
    for kw in kwargs_of:
        kw["use_cache"] = False  # type: ignore[index]
    return CapturedInputs(hidden, kwargs_of)  # type: ignore[arg-type]


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """One decoder block's output hidden states (tuple outputs unwrapped)."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class _InputsSeen(Exception):
    """Raised by :func:`record_inputs` with ``stop=True`` once every named input was seen."""


@contextlib.contextmanager
def record_inputs(block: nn.Module, names: Sequence[str], *, stop: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Record the input tensor of every named linear of ``block`` during the forwards inside.

    Use under ``torch.no_grad()``: the tensors are kept as passed (not detached copies), so that
    linears fed the very same tensor (q/k/v, gate/up) can be recognised and share statistics.
    With ``stop=True`` the forward is cut short once all named inputs were seen (the rest of
    the block is not needed); the ``with`` body then ends there, without an output.
    """
    seen: dict[str, torch.Tensor] = {}
    handles = []
    wanted = set(names)
    for name in names:
        def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...], name: str = name) -> None:
            seen[name] = inputs[0]  # the object itself: linears reading one tensor are grouped by identity
            if stop and wanted.issubset(seen):
                raise _InputsSeen
        handles.append(block.get_submodule(name).register_forward_pre_hook(hook))
    try:
        yield seen
    except _InputsSeen:
        pass
    finally:
        for h in handles:
            h.remove()


def block_linear_names(model: nn.Module) -> list[str]:
    """Compressible linears relative to one block, in execution order (from the arch registry)."""
    return get_arch(model.config).block_linear_names()


def sublayer_of(local_name: str) -> str:
    """The sublayer (attention / MLP attribute) a block-local linear name belongs to."""
    return local_name.split(".")[0]


def check_finite_activations(states: torch.Tensor, where: str) -> None:
    """Non-finite activations make every statistic meaningless: fail naming the place."""
    if not torch.isfinite(states).all():
        raise FactorlmError(f"{where}: calibration activations contain NaN or Inf")


@dataclass
class BlockStats:
    """Per-linear input statistics of one block (members of an input group share one object)
    and the block's outputs on the streams that were run."""

    stats: dict[str, InputStats]
    student_out: list[torch.Tensor]
    teacher_out: list[torch.Tensor] | None


@dataclass
class TeacherRecord:
    """What the dense block did on the teacher stream: each named linear's input and the
    block's output, one entry per calibration batch (on the CPU).

    Linears that read the same tensor (q/k/v, gate/up) share one tensor object in
    ``inputs``, so the record also tells the input groups. Recording the teacher once per
    block, before any of its linears is factorized, is what lets the sequential compressor
    gather each group's statistics with a student forward alone.
    """

    inputs: list[dict[str, torch.Tensor]]
    outputs: list[torch.Tensor]


@torch.no_grad()
def teacher_pass(block: nn.Module, names: Sequence[str], inputs: Sequence[torch.Tensor], kwargs: dict[str, Any],
                 device: torch.device, *, where: str = "") -> TeacherRecord:
    """Run the (dense) ``block`` on the teacher stream once, recording the ``names`` linears' inputs."""
    record = TeacherRecord([], [])
    for x in inputs:
        with record_inputs(block, names) as seen:
            y = run_block(block, x.to(device), kwargs)
        moved: dict[int, torch.Tensor] = {}
        batch: dict[str, torch.Tensor] = {}
        for name in names:
            if name not in seen:
                raise FactorlmError(f"linear {name!r} was not called in the block forward")
            t = seen[name]
            if id(t) not in moved:
                check_finite_activations(t, f"layer {where + '.' if where else ''}{name} (teacher stream)")
                moved[id(t)] = t.detach().to("cpu")
            batch[name] = moved[id(t)]
        record.inputs.append(batch)
        record.outputs.append(y.to("cpu"))
    return record


@torch.no_grad()
def probe_groups(block: nn.Module, names: Sequence[str], x: torch.Tensor, kwargs: dict[str, Any],
                 device: torch.device) -> list[list[str]]:
    """``names`` split into groups of linears that read the same input tensor, from one forward on ``x``."""
    with record_inputs(block, names, stop=True) as seen:
        run_block(block, x.to(device), kwargs)
    return groups_of(names, seen)


def groups_of(names: Sequence[str], seen: dict[str, torch.Tensor]) -> list[list[str]]:
    """Consecutive ``names`` whose recorded input is one tensor object form one group."""
    groups: list[list[str]] = []
    for name in names:
        if name not in seen:
            raise FactorlmError(f"linear {name!r} was not called in the block forward")
        if groups and seen[groups[-1][0]] is seen[name]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


@torch.no_grad()
def block_statistics(
    block: nn.Module, names: Sequence[str], student_in: Sequence[torch.Tensor],
    teacher: TeacherRecord | None, kwargs: dict[str, Any], device: torch.device,
    *, where: str = "", outputs: bool = True,
) -> BlockStats:
    """Run ``block`` on the student stream and accumulate the statistics of the ``names`` linears.

    ``gram`` and ``abs_sum`` come from the student stream run through ``block``; ``cross`` (Δ)
    pairs the teacher's inputs of the same linear on the same batch (``teacher``, recorded by
    :func:`teacher_pass` on the dense block) with the student's. When ``block`` already holds
    some factorized linears, the student inputs of the later linears carry that error, so a
    method can compensate it. Linears that read the same tensor (q/k/v, gate/up) share one
    :class:`InputStats`, so one whitening serves them. Outputs are moved to the CPU; with
    ``outputs=False`` each forward stops once the named inputs were seen and no outputs are
    returned.
    """
    stats: dict[str, InputStats] = {}
    student_out: list[torch.Tensor] = []
    for i, xs in enumerate(student_in):
        with record_inputs(block, names, stop=not outputs) as s_seen:
            s_y = run_block(block, xs.to(device), kwargs)
        if outputs:
            student_out.append(s_y.to("cpu"))
        if not stats:
            _group(stats, names, s_seen)
        done: set[int] = set()
        for name in names:
            st = stats[name]
            if id(st) in done:
                continue
            done.add(id(st))
            x = s_seen[name]
            check_finite_activations(x, f"layer {where + '.' if where else ''}{name}")
            flat = x.reshape(-1, x.shape[-1])
            gram = flat.float().T @ flat.float()
            st.gram = _add(st.gram, gram)
            half = st.parts[i % 2]
            half.gram = _add(half.gram, gram)
            half.count += flat.shape[0]
            a = flat.double().abs().sum(0)
            st.abs_sum = a if st.abs_sum is None else st.abs_sum + a
            st.count += flat.shape[0]
            if teacher is not None:
                xt = teacher.inputs[i][name].to(flat.device).reshape(flat.shape)
                cross = (xt.float() - flat.float()).T @ flat.float()
                st.cross = _add(st.cross, cross)
                half.cross = _add(half.cross, cross)
    return BlockStats(stats, student_out, teacher.outputs if teacher is not None and outputs else None)


def _add(total: torch.Tensor | None, update: torch.Tensor) -> torch.Tensor:
    """Accumulate a per-batch statistic (computed in fp32, fast) into an fp64 running sum."""
    return update.double() if total is None else total + update.double()


def _group(stats: dict[str, InputStats], names: Sequence[str], seen: dict[str, torch.Tensor]) -> None:
    """One InputStats per distinct input tensor; linears reading the same tensor share it."""
    for i, name in enumerate(names):
        if name not in seen:
            raise FactorlmError(f"linear {name!r} was not called in the block forward")
        shared = next((stats[p] for p in names[:i] if seen[p] is seen[name]), None)
        stats[name] = shared if shared is not None else InputStats(parts=[InputStats(), InputStats()])
