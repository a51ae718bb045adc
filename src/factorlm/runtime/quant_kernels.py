"""The matmul paths of quantized layers: a registry of kernels, each declaring what it needs.

A kernel turns one stored weight part (codes + scales, see :mod:`.quant`) into a prepared
state once (:meth:`QuantKernel.prepare`) and multiplies activations by it per call
(:meth:`QuantKernel.apply`). It declares the weight bits, devices and shapes it accepts
(:meth:`QuantKernel.unsupported` says why not, naming the part) and whether it is *exact*:
an exact kernel computes ``x @ (codes * scales)^T`` in the activations' dtype (fp32
rounding only); an inexact one rounds activations and scales to bf16 on the way (the
stated tolerance is :data:`BF16_TOLERANCE`, relative to the output's largest magnitude).

Measured on the sample model's factor shapes (``bench_quant.py --kernels``, 1 thread,
``results/quant_kernels.json``): ``torch._weight_int8pack_mm`` with fp32 activations is
5-60x slower than an fp32 matmul, but with bf16 activations (cast once per factored
layer) it is 1.5-1.7x faster at batch 1 on the larger factor pairs (it reads a quarter of
the bytes), about 2x at batch 8, and slower at batch 1 on the smallest (192x576, rank
128: 12.6 vs 8.4 us), where the casts dominate; ``_weight_int4pack_mm_for_cpu`` is
fast likewise only with bf16 activations. So the default "cached" stays exact (dequantized once, fp32
matmuls) and the bf16-activation kernels are opt-in ("int8-bf16", "int4-bf16"), or picked
by "fastest", which takes the first kernel of :data:`FAST_ORDER` a part supports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .format import FactorlmError

BF16_TOLERANCE = 2e-2  # inexact kernels: max |y - y_exact| / max |y_exact| on random inputs
INT4PACK_GROUPS = (32, 64, 128, 256)


@dataclass(frozen=True)
class PartInfo:
    """What a kernel needs to know about one stored weight part."""

    name: str  # e.g. "weight_v" of a layer, for error messages
    qweight: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int | None
    out_features: int
    in_features: int
    dequantize: Callable[[torch.dtype], torch.Tensor]  # exactly codes * scales
    dtype: torch.dtype = torch.float32  # the activations' dtype the layer computes in
    column_major: bool = False  # the fp copy is faster column-major on CPU (layout.py's choice)

    @property
    def device_type(self) -> str:
        return self.qweight.device.type


@dataclass(frozen=True)
class QuantKernel:
    """One matmul path: requirements, exactness, and the prepare/apply pair."""

    name: str
    bits: tuple[int, ...]
    devices: tuple[str, ...] | None  # None: any device
    exact: bool
    prepare: Callable[[PartInfo], Any]
    apply: Callable[[torch.Tensor, Any], torch.Tensor]
    check: Callable[[PartInfo], str | None] = lambda part: None  # an extra shape requirement
    summary: str = ""
    # the activations' dtype ``apply`` takes and returns; None: the layer's compute dtype. A
    # factored layer whose two parts share it casts once on the way in and once on the way
    # out, not around each part (the casts cost as much as the small rank's matmul)
    act_dtype: torch.dtype | None = None

    def unsupported(self, part: PartInfo) -> str | None:
        """Why this kernel cannot run ``part`` (None when it can)."""
        if part.bits not in self.bits:
            return f"kernel {self.name!r} needs {'/'.join(map(str, self.bits))}-bit weights, {part.name} is {part.bits}-bit"
        if self.devices is not None and part.device_type not in self.devices:
            return f"kernel {self.name!r} runs on {'/'.join(self.devices)}, {part.name} is on {part.device_type}"
        reason = self.check(part)
        return f"kernel {self.name!r}: {part.name}: {reason}" if reason else None


KERNELS: dict[str, QuantKernel] = {}


def register_kernel(kernel: QuantKernel) -> QuantKernel:
    KERNELS[kernel.name] = kernel
    return kernel


# --------------------------------------------------------------------------- exact kernels


def _prepare_cached(part: PartInfo) -> torch.Tensor:
    w = part.dequantize(part.dtype)
    return w.t().contiguous().t() if part.column_major and w.device.type == "cpu" else w


def _apply_weight(x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    return F.linear(x, state)


def _apply_dequant(x: torch.Tensor, part: PartInfo) -> torch.Tensor:
    return F.linear(x, part.dequantize(x.dtype))


def _int8pack(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).contiguous(), qweight, scales)
    return y.reshape(*shape[:-1], y.shape[-1])


def _apply_int8pack(x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    qweight, scales = state
    return _int8pack(x, qweight, scales.to(x.dtype))


register_kernel(QuantKernel("cached", (4, 8), None, True, _prepare_cached, _apply_weight,
                            summary="dequantize once at prepare, fp32 matmuls (default)"))
register_kernel(QuantKernel("dequant", (4, 8), None, True, lambda part: part, _apply_dequant,
                            summary="dequantize every call, no second copy of the weights"))
register_kernel(QuantKernel("int8pack", (8,), ("cpu", "cuda"), True,
                            lambda part: (_own_copy(part.qweight), part.scales), _apply_int8pack,
                            summary="torch._weight_int8pack_mm in the activations' dtype"))


# --------------------------------------------------------------------------- bf16-activation kernels


def _own_copy(t: torch.Tensor) -> torch.Tensor:
    """A fresh allocation of ``t``, so the packed kernels never read a tensor that shares
    storage with the loaded checkpoint (a benchmark process died of a general protection
    fault inside libtorch while scoring a loaded int8 checkpoint on this kernel)."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def _prepare_int8_bf16(part: PartInfo) -> tuple[torch.Tensor, torch.Tensor]:
    return _own_copy(part.qweight), part.scales.to(torch.bfloat16).contiguous()


def _apply_int8_bf16(x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    qweight, scales = state
    return _int8pack(x, qweight, scales)  # x is bf16 (act_dtype); so is the result


def _check_int4pack(part: PartInfo) -> str | None:
    if part.group_size not in INT4PACK_GROUPS:
        return f"group size {part.group_size} is not one of {INT4PACK_GROUPS}"
    if part.out_features % 16:
        return f"output dimension {part.out_features} is not a multiple of 16"
    return None


def _prepare_int4_bf16(part: PartInfo) -> tuple[torch.Tensor, int, torch.Tensor]:
    """torch's CPU int4 layout: unsigned nibbles (code + 8) and [K / G, N, 2] (scale, zero) with zero 0."""
    from .quant import unpack_int4

    unsigned = (unpack_int4(part.qweight).to(torch.int32) + 8).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1)
    scales = part.scales.to(torch.float32).t()
    scale_zeros = torch.stack([scales, torch.zeros_like(scales)], dim=-1).to(torch.bfloat16).contiguous()
    return packed, int(part.group_size or 0), scale_zeros


def _apply_int4_bf16(x: torch.Tensor, state: tuple[torch.Tensor, int, torch.Tensor]) -> torch.Tensor:
    packed, group, scale_zeros = state
    shape = x.shape
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).contiguous(), packed, group, scale_zeros)
    return y.reshape(*shape[:-1], y.shape[-1])  # bf16 in (act_dtype), bf16 out


register_kernel(QuantKernel("int8-bf16", (8,), ("cpu",), False, _prepare_int8_bf16, _apply_int8_bf16,
                            summary="torch._weight_int8pack_mm with bf16 activations and scales",
                            act_dtype=torch.bfloat16))
register_kernel(QuantKernel("int4-bf16", (4,), ("cpu",), False, _prepare_int4_bf16, _apply_int4_bf16,
                            check=_check_int4pack,
                            summary="torch's CPU int4pack matmul with bf16 activations and scales",
                            act_dtype=torch.bfloat16))

# a selector resolves per part to the first kernel of its order that the part supports
FAST_ORDER = ("int8-bf16", "int4-bf16", "cached")  # measured order on CPU
SELECTORS: dict[str, tuple[str, ...]] = {"fastest": FAST_ORDER}


def kernel_names() -> tuple[str, ...]:
    return (*KERNELS, *SELECTORS)


def select_kernel(name: str, part: PartInfo) -> QuantKernel:
    """The kernel ``name`` for ``part`` ("fastest" resolves per part); an unsupported request raises, naming both."""
    if name in SELECTORS:
        return next(KERNELS[k] for k in SELECTORS[name] if KERNELS[k].unsupported(part) is None)
    kernel = KERNELS.get(name)
    if kernel is None:
        raise FactorlmError(f"unknown quantized kernel {name!r}; choose from {kernel_names()}")
    reason = kernel.unsupported(part)
    if reason:
        raise FactorlmError(reason)
    return kernel
