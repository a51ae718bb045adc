"""Quantized linear layers and the model-level swaps that use them.

``QuantizedFactoredLinear`` holds a factored layer's U and V as integer codes plus float
scales (format version 2, math in :mod:`.quant`); ``QuantizedLinear`` does the same for a
dense weight (the "dense int8" baseline in the same format). The codes and scales are
persistent buffers, so ``state_dict``/``save_pretrained`` write exactly what the checkpoint
holds, and loading assigns them without conversion.

How a quantized layer multiplies is a kernel of :mod:`.quant_kernels`, chosen per layer by
:meth:`_QuantizedBase.prepare`: "cached" (default, exact: the stored codes dequantized once
at load, fp32 matmuls, so the bytes saved are on disk and in transfer), "dequant" (every
call, no second copy), "int8pack", and the faster inexact bf16-activation kernels
"int8-bf16" / "int4-bf16" ("fastest" picks the first a layer supports).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .factored_linear import FactoredLinear
from .format import FormatError
from .quant import QuantOptions
from .quant_embedding import dequantize_embeddings, quantized_embeddings, replace_embeddings
from .quant_kernels import PartInfo, QuantKernel, kernel_names, select_kernel

QUANT_KERNELS = kernel_names()
DEFAULT_KERNEL = "cached"
COLUMN_MAJOR_PARTS = ("weight_u", "weight")  # as layout.py stores fp U and dense W on CPU


def _register_quantized(module: nn.Module, part: str, out_f: int, in_f: int, bits: int, group_size: int | None,
                        device: torch.device | str | None) -> None:
    """Empty ``<part>_qweight`` and ``<part>_scales`` buffers (persistent: they are what the checkpoint holds)."""
    from .quant import check_quant_params, qweight_dtype, qweight_shape, scales_shape

    check_quant_params(bits, group_size, in_f, f"{type(module).__name__} {part}")
    module.register_buffer(f"{part}_qweight", torch.empty(qweight_shape(bits, out_f, in_f), dtype=qweight_dtype(bits),
                                                         device=device))
    module.register_buffer(f"{part}_scales", torch.empty(scales_shape(bits, group_size, out_f, in_f),
                                                        dtype=torch.float32, device=device))


def _set_quantized(module: nn.Module, part: str, weight: torch.Tensor, gram: torch.Tensor | None,
                   options: QuantOptions | None) -> None:
    from .quant import quantize

    q, s = quantize(weight.detach().float(), module.bits, module.group_size, gram, options)
    setattr(module, f"{part}_qweight", q.to(weight.device).contiguous())  # int8pack and safetensors want contiguous
    setattr(module, f"{part}_scales", s.to(weight.device).contiguous())


class _QuantizedBase(nn.Module):
    """Shared logic: stored codes + scales per weight part, dequantized once or per call."""

    parts: tuple[str, ...] = ()

    def _init_common(self, bits: int, group_size: int | None, bias: bool, out_features: int,
                     device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        self.bits = bits
        self.group_size = group_size if bits == 4 else None
        self.compute_dtype = dtype or torch.float32
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.kernel = "dequant"  # until prepare(): no second copy of the weights before they are loaded
        self._kernels: dict[str, QuantKernel] = {}
        self._states: dict[str, Any] = {}
        self._prepared_for: tuple[torch.device, torch.dtype] | None = None

    def dequantized(self, part: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The floating-point weight ``part`` stands for (exactly codes * scales, in fp32 then cast)."""
        from .quant import dequantize

        return dequantize(getattr(self, f"{part}_qweight"), getattr(self, f"{part}_scales"), self.bits,
                          self.group_size, dtype or self.compute_dtype)

    def part_info(self, part: str) -> PartInfo:
        q = getattr(self, f"{part}_qweight")
        in_f = q.shape[1] * (2 if self.bits == 4 else 1)
        return PartInfo(f"{type(self).__name__} {part}", q, getattr(self, f"{part}_scales"), self.bits,
                        self.group_size, q.shape[0], in_f, lambda dtype, p=part: self.dequantized(p, dtype),
                        self.compute_dtype, part in COLUMN_MAJOR_PARTS)

    def prepare(self, kernel: str = DEFAULT_KERNEL) -> None:
        """Choose the matmul path of every part (see :mod:`.quant_kernels`) and prepare its state now.

        The states follow the activations: a call with another device or dtype prepares again.
        """
        kernels = {p: select_kernel(kernel, self.part_info(p)) for p in self.parts}  # raises before changing state
        self.kernel, self._kernels = kernel, kernels
        self._states = {p: k.prepare(self.part_info(p)) for p, k in kernels.items()}
        self._prepared_for = (getattr(self, f"{self.parts[0]}_qweight").device, self.compute_dtype)

    def _ensure_prepared(self, x: torch.Tensor) -> None:
        """Prepare again when the layer input's device or dtype moved since :meth:`prepare`."""
        if self._kernels and self._prepared_for != (x.device, x.dtype):
            self.compute_dtype = x.dtype
            self.prepare(self.kernel)

    def _part_matmul(self, x: torch.Tensor, part: str) -> torch.Tensor:
        """``part``'s matmul; the result is in its kernel's activation dtype (see ``QuantKernel.act_dtype``)."""
        if not self._kernels:
            return F.linear(x, self.dequantized(part, x.dtype))
        kernel = self._kernels[part]
        dtype = kernel.act_dtype or self.compute_dtype
        return kernel.apply(x if x.dtype == dtype else x.to(dtype), self._states[part])

    @staticmethod
    def _finish(y: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
        y = y if y.dtype == dtype else y.to(dtype)
        return y + bias if bias is not None else y

    def trainable_scales(self) -> list[nn.Parameter]:
        """Turn every part's scales into parameters and multiply through the dequantized weights.

        The codes stay fixed and every weight is still exactly ``code * scale``, so a trained
        layer saves in the same format; only the per-channel/per-group step sizes move (the
        scale-only fine-tuning of quantized weights that PEQA, Kim et al. 2023, describes).
        The matmul becomes the differentiable per-call dequantization; :meth:`prepare` again
        after training for a fast kernel.
        """
        params = []
        for part in self.parts:
            name = f"{part}_scales"
            value = self._buffers.pop(name, None)
            if value is None:  # already a parameter
                params.append(getattr(self, name))
                continue
            param = nn.Parameter(value.detach().clone())
            self.register_parameter(name, param)
            params.append(param)
        self._kernels, self._states, self.kernel = {}, {}, "dequant"
        return params

    def stored_bytes(self) -> int:
        return sum(getattr(self, f"{p}{s}").numel() * getattr(self, f"{p}{s}").element_size()
                   for p in self.parts for s in ("_qweight", "_scales"))


class QuantizedFactoredLinear(_QuantizedBase):
    """y = U(Vx) + b with U [out, r] and V [r, in] stored quantized (int8 per channel, int4 per group)."""

    parts = ("weight_u", "weight_v")

    def __init__(self, in_features: int, out_features: int, rank: int, bits: int, group_size: int | None = None,
                 bias: bool = False, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        _register_quantized(self, "weight_u", out_features, rank, bits, group_size, device)
        _register_quantized(self, "weight_v", rank, in_features, bits, group_size, device)
        self._init_common(bits, group_size, bias, out_features, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._ensure_prepared(x)
        return self._finish(self._part_matmul(self._part_matmul(x, "weight_v"), "weight_u"), x.dtype, self.bias)

    @classmethod
    def from_factored(cls, layer: FactoredLinear, bits: int, group_size: int | None = None,
                      gram: torch.Tensor | None = None, options: QuantOptions | None = None
                      ) -> "QuantizedFactoredLinear":
        """Quantize V (GPTQ with the layer-input Gram if given), then U (with the Gram of V_q x).

        With ``options.balance`` (off by default: it measured worse) U and V are first rebalanced (same product).
        """
        from .quant import balance_factors, refit_u

        opts = options or QuantOptions()
        u, v = layer.weight_u.detach().float(), layer.weight_v.detach().float()
        if opts.balance:
            u, v = balance_factors(u, v)
        new = cls(layer.in_features, layer.out_features, layer.rank, bits, group_size, bias=layer.bias is not None,
                  device="meta", dtype=layer.weight_u.dtype)
        _set_quantized(new, "weight_v", v, gram, opts)
        gram_u = None
        if gram is not None:
            vq = new.dequantized("weight_v", torch.float64)
            gram_u = vq @ gram.to(torch.float64) @ vq.T
            if opts.refit_u:
                u = refit_u(u, v, vq, gram)
        _set_quantized(new, "weight_u", u, gram_u, opts)
        if layer.bias is not None:
            new.bias = nn.Parameter(layer.bias.detach().clone())
        return new

    def to_factored(self) -> FactoredLinear:
        """The fp FactoredLinear with the dequantized factors (what the stored codes compute)."""
        bias = self.bias.detach() if self.bias is not None else None
        return FactoredLinear.from_factors(self.dequantized("weight_u"), self.dequantized("weight_v"), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bits={self.bits}, group_size={self.group_size}, kernel={self.kernel}")


class QuantizedLinear(_QuantizedBase):
    """A dense linear y = Wx + b with W stored quantized (the "dense int8/int4" baseline)."""

    parts = ("weight",)

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None,
                 bias: bool = False, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        _register_quantized(self, "weight", out_features, in_features, bits, group_size, device)
        self._init_common(bits, group_size, bias, out_features, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._ensure_prepared(x)
        return self._finish(self._part_matmul(x, "weight"), x.dtype, self.bias)

    @classmethod
    def from_linear(cls, layer: nn.Linear, bits: int, group_size: int | None = None,
                    gram: torch.Tensor | None = None, options: QuantOptions | None = None) -> "QuantizedLinear":
        new = cls(layer.in_features, layer.out_features, bits, group_size, bias=layer.bias is not None,
                  device="meta", dtype=layer.weight.dtype)
        _set_quantized(new, "weight", layer.weight, gram, options)
        if layer.bias is not None:
            new.bias = nn.Parameter(layer.bias.detach().clone())
        return new

    def to_linear(self) -> nn.Linear:
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        dense.weight = nn.Parameter(self.dequantized("weight"))
        if self.bias is not None:
            dense.bias = nn.Parameter(self.bias.detach())
        return dense

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, kernel={self.kernel}")


# --------------------------------------------------------------------------- model-level swaps


def _set_child(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantized_modules(model: nn.Module) -> dict[str, _QuantizedBase]:
    """Every quantized layer of ``model`` by fully-qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _QuantizedBase)}


def replace_with_quantized(model: nn.Module, ranks: dict[str, int], dense: list[str], bits: int,
                           group_size: int | None, device: torch.device | str = "meta",
                           embeddings: list[str] | tuple[str, ...] = ()) -> None:
    """Swap the named (factored or dense) linears, and ``embeddings``, for empty quantized modules,
    ready for ``load_state_dict``."""
    replace_embeddings(model, list(embeddings), device)
    for fqn, rank in ranks.items():
        m = model.get_submodule(fqn)
        _set_child(model, fqn, QuantizedFactoredLinear(m.in_features, m.out_features, rank, bits, group_size,
                                                       bias=m.bias is not None, device=device, dtype=_dtype_of(m)))
    for fqn in dense:
        m = model.get_submodule(fqn)
        _set_child(model, fqn, QuantizedLinear(m.in_features, m.out_features, bits, group_size,
                                               bias=m.bias is not None, device=device, dtype=_dtype_of(m)))


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def prepare_quantized(model: nn.Module, kernel: str = DEFAULT_KERNEL) -> int:
    """Choose the matmul path of every quantized layer (see the module docstring); returns how many."""
    layers = quantized_modules(model)
    for layer in layers.values():
        layer.prepare(kernel)
    return len(layers)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized layer by the fp layer its stored codes stand for (in place).

    Exporters that need plain weights (vLLM; ONNX before it re-inserts the stored codes)
    trace this; the values are exactly codes * scales. Quantized embeddings too.
    """
    dequantize_embeddings(model)
    for fqn, layer in quantized_modules(model).items():
        fp = layer.to_factored() if isinstance(layer, QuantizedFactoredLinear) else layer.to_linear()
        _set_child(model, fqn, fp)
    return model


def quant_fields(model: nn.Module, rounding: str | None) -> dict[str, Any]:
    """The format-version-2 fields the model's quantized layers imply (empty when it has none)."""
    layers = quantized_modules(model)
    if not layers:
        return {}
    schemes = {(m.bits, m.group_size) for m in layers.values()}
    if len(schemes) > 1:
        raise FormatError(f"quantized layers mix schemes {sorted(schemes, key=str)}; one (bits, group size) per checkpoint")
    bits, group = schemes.pop()
    return {"bits": bits, "group_size": group, "rounding": rounding or "rtn",
            "quantized_dense": [n for n, m in layers.items() if isinstance(m, QuantizedLinear)],
            "quantized_embeddings": list(quantized_embeddings(model))}
