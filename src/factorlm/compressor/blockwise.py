"""The block-wise two-stream compressor and the spectra pass that feeds rank allocation.

``compress_blocks`` walks the decoder blocks once. For each block it gathers the input
statistics of every linear on the student stream (the model compressed so far) and, for
methods that need it, the teacher stream (the dense model): the Gram ``H`` and the cross
statistic ``Δ``. It factorizes the block's linears with the planned ranks, calls the block
hooks (see :mod:`.hooks`), then advances the teacher stream through the dense block and the
student stream through the compressed block *as the hooks left it*, so every later layer
sees the accumulated error.

``spectra_pass`` walks the dense stream once before allocation and keeps only what the
allocators need: each linear's whitened singular-value energies, the sublayer importance
(1 − cos between a sublayer's input and output hidden states) for MGAA and, for ARA, the
full singular factors. Grams are dropped block by block, so memory stays bounded.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..runtime.arch import decoder_layers, get_arch
from ..runtime.factored_linear import FactoredLinear
from ..runtime.format import FactorlmError
from .allocation import LayerSpectrum, sublayer_importance
from .budget import LayerShape
from .hooks import BlockContext, BlockHook
from .methods import InputStats, Method, MethodOptions, output_error, spectrum_energy
from .streaming import (CapturedInputs, block_statistics, check_finite_activations, groups_of, probe_groups, run_block,
                        sublayer_of, teacher_pass, to_device)

logger = logging.getLogger(__name__)


def check_finite_weight(name: str, weight: torch.Tensor) -> None:
    """NaN/Inf in a weight make every factorization meaningless: fail naming the layer."""
    if not torch.isfinite(weight).all():
        raise FactorlmError(f"layer {name!r}: weight contains NaN or Inf")


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def factorize_linear(linear: nn.Linear, method: Method, stats: InputStats | None, rank: int,
                     opts: MethodOptions, device: torch.device) -> tuple[FactoredLinear, dict[str, Any]]:
    """Factor one linear with ``method``; returns the new module and its report fields."""
    weight = linear.weight.detach().to(device)
    u, v, extra = method.factorize(weight, stats, rank, opts)
    approx = u @ v
    w64 = weight.double()
    fields: dict[str, Any] = dict(extra)
    fields["rel_weight_error"] = float((w64 - approx).norm() / w64.norm().clamp_min(1e-30))
    err = output_error(weight, approx, stats.gram if stats is not None else None)
    fields["rel_output_error"] = None if err is None else round(err, 6)
    bias = linear.bias.detach().clone() if linear.bias is not None else None
    layer = FactoredLinear.from_factors(u.to(linear.weight.dtype).contiguous(), v.to(linear.weight.dtype).contiguous(),
                                        bias)
    return layer, fields


def input_groups(names: Sequence[str], stats: Mapping[str, InputStats]) -> list[list[str]]:
    """``names`` (execution order) split into groups of linears that read the same input tensor.

    Linears sharing one :class:`InputStats` read one tensor (q/k/v, gate/up); without statistics
    every linear is its own group.
    """
    groups: list[list[str]] = []
    for name in names:
        st = stats.get(name)
        if groups and st is not None and stats.get(groups[-1][0]) is st:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


class BlockIO(Protocol):
    """Where a block's weights come from and go to when the model is larger than RAM.

    ``load`` brings block ``index``'s parameters onto the CPU before it is processed,
    ``release`` frees them afterwards (see :mod:`.source`). Without one, every block is
    already in memory.
    """

    def load(self, index: int, block: nn.Module) -> None: ...

    def release(self, index: int, block: nn.Module) -> None: ...


# called after block ``index`` is finished: (index, block, its report rows, student stream, teacher stream)
BlockDone = Callable[[int, nn.Module, list[dict[str, Any]], list[torch.Tensor], "list[torch.Tensor] | None"], None]


@dataclass
class StreamResult:
    """Per-layer report rows (in execution order) of a streaming compression."""

    rows: list[dict[str, Any]] = field(default_factory=list)


def compress_blocks(
    model: nn.Module, captured: CapturedInputs | None, plan: Mapping[str, int | None], method: Method,
    opts: MethodOptions, *, hooks: Sequence[BlockHook] = (), device: torch.device | str = "cpu",
    keep_teacher: bool | None = None, progress: bool = True, sequential: bool = True,
    io: BlockIO | None = None, on_block_done: BlockDone | None = None, start: int = 0,
    streams: tuple[list[torch.Tensor], list[torch.Tensor] | None] | None = None,
) -> list[dict[str, Any]]:
    """Factorize every block linear in place, block by block; returns the report rows.

    ``captured`` holds block-0 inputs and block kwargs (``None`` only for methods that need
    no calibration and when there are no hooks). The teacher stream is kept when the method
    needs it or hooks are given (``keep_teacher`` overrides). With ``sequential`` (default)
    the linears of a block are factorized group by group in execution order (q/k/v, o,
    gate/up, down), each group's statistics gathered with the earlier groups already
    factorized, so a layer also sees the error made earlier in its own block; otherwise all
    statistics come from the dense block (one pass). The teacher stream runs the dense block
    once per block (:func:`.streaming.teacher_pass`, its linears' inputs kept on the CPU), so a
    group costs one student forward that stops after the group's input.

    Larger-than-RAM runs pass ``io`` (load a block's weights before, release them after)
    and ``on_block_done`` (write the finished block); a resumed run starts at block
    ``start`` with the ``streams`` (student, teacher) saved after block ``start - 1``.
    """
    device = torch.device(device)
    spec = get_arch(model.config)
    layers = decoder_layers(model)
    names = spec.block_linear_names()
    streaming = captured is not None
    if (method.needs_calibration or hooks) and not streaming:
        raise FactorlmError(f"method {method.name!r}{' with block hooks' if hooks else ''} needs calibration data")
    teacher_needed = (method.needs_teacher or bool(hooks)) if keep_teacher is None else keep_teacher
    student = list(captured.hidden) if streaming else []
    teacher = student if streaming and teacher_needed else None
    if streams is not None and start > 0:
        student, teacher = list(streams[0]), (list(streams[1]) if streams[1] is not None else None)
        if teacher is None and streaming and teacher_needed:
            raise FactorlmError("resuming a teacher-stream method needs the saved teacher stream")
    rows: list[dict[str, Any]] = []
    bar = tqdm(layers, desc=f"compress ({method.name})", unit="block", disable=not progress)
    for index, block in enumerate(bar):
        if index < start:
            continue
        prefix = f"{spec.layers_path}.{index}"
        if io is not None:
            io.load(index, block)
        block.to(device)
        kwargs = to_device(captured.block_kwargs[index], device) if streaming else {}
        started = time.perf_counter()
        dense_block = copy.deepcopy(block) if hooks else None
        record = teacher_pass(block, names, teacher, kwargs, device, where=prefix) if teacher is not None else None
        stats: dict[str, InputStats] = {}
        if not streaming:
            groups = [[n] for n in names]
        elif not sequential:
            stats = block_statistics(block, names, student, record, kwargs, device, where=prefix, outputs=False).stats
            groups = input_groups(names, stats)
        else:
            groups = groups_of(names, record.inputs[0]) if record is not None else \
                probe_groups(block, names, student[0], kwargs, device)
        stats_time = time.perf_counter() - started
        ranks: dict[str, int | None] = {}
        block_rows: dict[str, dict[str, Any]] = {}
        for group in groups:
            if streaming and sequential and (hooks or any(plan.get(f"{prefix}.{n}") is not None for n in group)):
                # the student inputs of this group carry the error of the block's earlier, factorized linears
                t0 = time.perf_counter()
                stats.update(block_statistics(block, group, student, record, kwargs, device, where=prefix,
                                              outputs=False).stats)
                stats_time += time.perf_counter() - t0
            for local in group:
                full = f"{prefix}.{local}"
                linear = block.get_submodule(local)
                check_finite_weight(full, linear.weight)
                rank = plan.get(full)
                ranks[full] = rank
                shape = LayerShape(linear.out_features, linear.in_features)
                row: dict[str, Any] = {"module": full, "shape": [shape.out_features, shape.in_features],
                                       "params_before": shape.dense_params}
                t0 = time.perf_counter()
                if rank is None:
                    row.update(rank=None, dense=True, params_after=shape.dense_params, rel_weight_error=0.0,
                               rel_output_error=0.0)
                else:
                    layer, fields = factorize_linear(linear, method, stats.get(local), rank, opts, device)
                    _set_submodule(block, local, layer)
                    row.update(rank=rank, dense=False, params_after=shape.factored_params(rank), **fields)
                row["time_s"] = round(time.perf_counter() - t0, 4)
                block_rows[full] = row
        for row in block_rows.values():
            row["time_s"] = round(row["time_s"] + stats_time / len(names), 4)
        for hook in hooks:
            ctx = BlockContext(
                index=index, num_blocks=len(layers), block=block, dense_block=dense_block,  # type: ignore[arg-type]
                student_inputs=student, teacher_inputs=teacher if teacher is not None else student,
                block_kwargs=kwargs, linear_names={local: f"{prefix}.{local}" for local in names}, ranks=ranks,
                grams={local: stats[local].gram for local in names if local in stats},
                device=device,
            )
            for full, extra in (hook(ctx) or {}).items():
                if full not in block_rows:
                    raise FactorlmError(f"block hook returned report fields for unknown layer {full!r}")
                block_rows[full].update(extra)
        if streaming:
            with torch.no_grad():
                nxt = [run_block(block, x.to(device), kwargs).to("cpu") for x in student]
            for t in nxt:
                check_finite_activations(t, f"output of block {prefix}")
            if record is not None:
                teacher = record.outputs
            student = nxt
        rows.extend(block_rows.values())
        block.to("cpu")
        if dense_block is not None:
            del dense_block
        if on_block_done is not None:
            on_block_done(index, block, list(block_rows.values()), student,
                          teacher if teacher is not student else None)
        if io is not None:
            io.release(index, block)
    return rows


@dataclass
class SpectraResult:
    """What the allocators need, from one dense-stream pass."""

    spectra: dict[str, LayerSpectrum]
    importance: dict[str, float]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    time_s: float = 0.0


def layer_spectrum_basis(weight: torch.Tensor, stats: InputStats | None, method: Method, opts: MethodOptions
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The matrix whose singular values measure the method's loss, and the map back to weight space.

    svd: ``W`` (weight-space loss); asvd: ``W diag(s)``; svd-llm/saes: ``W S`` (output loss on
    the calibration inputs). Returns (matrix, inverse map or None for the identity).
    """
    w = weight.double()
    if method.name == "svd" or stats is None or stats.gram is None:
        return w, None
    if method.name == "asvd":
        s = (stats.abs_sum / stats.count).double().clamp_min(1e-8) ** 0.5
        return w * s, torch.diag(1.0 / s)
    white = stats.whitening(opts.damping)
    return w @ white.sqrt, white.inv_sqrt


def weight_spectra(model: nn.Module, io: BlockIO | None = None) -> dict[str, LayerSpectrum]:
    """Plain singular-value energies of every block linear (for ``svd`` without calibration)."""
    spec = get_arch(model.config)
    out: dict[str, LayerSpectrum] = {}
    for index, block in enumerate(decoder_layers(model)):
        if io is not None:
            io.load(index, block)
        for local in spec.block_linear_names():
            lin = block.get_submodule(local)
            full = f"{spec.layers_path}.{index}.{local}"
            check_finite_weight(full, lin.weight)
            out[full] = LayerSpectrum(full, LayerShape(lin.out_features, lin.in_features),
                                      spectrum_energy(lin.weight.detach()).cpu(),
                                      f"{spec.layers_path}.{index}.{sublayer_of(local)}")
        if io is not None:
            io.release(index, block)
    return out


@torch.no_grad()
def spectra_pass(
    model: nn.Module, captured: CapturedInputs, method: Method, opts: MethodOptions, *,
    importance: bool = False, factors: bool = False, device: torch.device | str = "cpu", progress: bool = True,
    io: BlockIO | None = None,
) -> SpectraResult:
    """One dense-stream pass: per-linear energies (and importance / ARA factors on request)."""
    started = time.perf_counter()
    device = torch.device(device)
    spec = get_arch(model.config)
    names = spec.block_linear_names()
    mlp_attr = spec.mlp[0]
    dense = list(captured.hidden)
    result = SpectraResult({}, {}, {})
    for index, block in enumerate(tqdm(decoder_layers(model), desc="spectra", unit="block", disable=not progress)):
        prefix = f"{spec.layers_path}.{index}"
        if io is not None:
            io.load(index, block)
        block.to(device)
        kwargs = to_device(captured.block_kwargs[index], device)
        bstats = block_statistics(block, names, dense, None, kwargs, device, where=prefix)
        for local in names:
            full = f"{prefix}.{local}"
            lin = block.get_submodule(local)
            check_finite_weight(full, lin.weight)
            matrix, back = layer_spectrum_basis(lin.weight.detach().to(device), bstats.stats[local], method, opts)
            if factors:
                u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
                right = vh if back is None else vh @ back
                bias = lin.bias.detach().clone().cpu() if lin.bias is not None else None
                result.factors[full] = ((u * s).float().cpu(), right.float().cpu(), bias)
                energy = s**2
            else:
                energy = spectrum_energy(matrix)
            result.spectra[full] = LayerSpectrum(full, LayerShape(lin.out_features, lin.in_features),
                                                 energy.cpu(), f"{prefix}.{sublayer_of(local)}")
        if importance:
            result.importance.update(_importance(block, prefix, spec.attention[0], mlp_attr, dense,
                                                 bstats.student_out, kwargs, device))
        dense = bstats.student_out
        block.to("cpu")
        if io is not None:
            io.release(index, block)
    result.time_s = time.perf_counter() - started
    return result


def _importance(block: nn.Module, prefix: str, attn_attr: str, mlp_attr: str, inputs: Sequence[torch.Tensor],
                outputs: Sequence[torch.Tensor], kwargs: dict[str, Any], device: torch.device) -> dict[str, float]:
    """1 − mean cos(in, out) of the attention and MLP sublayers of one block.

    The hidden state between the sublayers is the block output with the MLP's output zeroed
    (a forward hook), which works whatever norms surround the residual additions.
    """
    mlp = block.get_submodule(mlp_attr)
    handle = mlp.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
    try:
        mids = [run_block(block, x.to(device), kwargs).to("cpu") for x in inputs]
    finally:
        handle.remove()
    h_in = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs])
    h_mid = torch.cat([x.reshape(-1, x.shape[-1]) for x in mids])
    h_out = torch.cat([x.reshape(-1, x.shape[-1]) for x in outputs])
    return {f"{prefix}.{attn_attr}": sublayer_importance(h_in, h_mid),
            f"{prefix}.{mlp_attr}": sublayer_importance(h_mid, h_out)}
