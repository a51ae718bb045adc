"""Weight quantization math for factors and dense weights (pure functions, no I/O).

Two schemes, both symmetric (no zero point), both along the *input* dimension of a
weight W [out, in] so that every output channel is scaled on its own:

- **int8, per output channel**: ``scales[o] = max|W[o, :]| / 127``, ``q = round(W / scale)``
  in [-127, 127], stored as ``int8`` [out, in]; ``W ~ q * scales[:, None]``.
- **int4, group-wise**: groups of ``group_size`` consecutive input columns share a scale,
  ``scales[o, g] = max|W[o, gG:(g+1)G]| / 7``, ``q`` in [-7, 7]; stored *offset by 8* as
  unsigned nibbles (1..15) packed two per ``uint8`` [out, in / 2], the even column in the
  low nibble. That is ONNX Runtime's MatMulNBits layout (zero point 8), so the exporter
  hands the stored bytes over unchanged.

Rounding is round-to-nearest (RTN) unless an input Gram ``H = X^T X`` of the layer is
given: then GPTQ-style error feedback (Frantar et al., 2022) quantizes one column at a
time and spreads its rounding error onto the columns not yet quantized, weighted by the
inverse Gram, which minimises the layer's *output* error ``||X (W - Q)^T||`` rather than
the weight error.
"""

from __future__ import annotations

import math

import torch

from .format import FactorlmError

SUPPORTED_BITS = (4, 8)
QMAX = {8: 127, 4: 7}
INT4_OFFSET = 8


def check_quant_params(bits: int, group_size: int | None, in_features: int, where: str) -> None:
    """Raise a FactorlmError naming ``where`` unless (bits, group_size) fit a weight with ``in_features`` inputs."""
    if bits not in SUPPORTED_BITS:
        raise FactorlmError(f"{where}: bits must be 4 or 8, got {bits!r}")
    if bits == 8:
        if group_size not in (None, 0):
            raise FactorlmError(f"{where}: int8 is per output channel; group size {group_size} is not supported")
        return
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2 or group_size % 2:
        raise FactorlmError(f"{where}: int4 needs an even group size >= 2, got {group_size!r}")
    if in_features % group_size:
        raise FactorlmError(f"{where}: group size {group_size} does not divide the input dimension {in_features}")


def scales_shape(bits: int, group_size: int | None, out_features: int, in_features: int) -> tuple[int, ...]:
    """Shape of the scales tensor: [out] for int8, [out, in / group_size] for int4."""
    return (out_features,) if bits == 8 else (out_features, in_features // int(group_size or 1))


def qweight_shape(bits: int, out_features: int, in_features: int) -> tuple[int, int]:
    """Shape of the stored integer tensor: [out, in] int8, or [out, in / 2] packed uint8 for int4."""
    return (out_features, in_features) if bits == 8 else (out_features, in_features // 2)


def qweight_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits == 8 else torch.uint8


def _safe_scale(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """``amax / qmax``, with 1 where a row/group is all zeros (q is then 0 whatever the scale)."""
    scale = amax / qmax
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def compute_scales(weight: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """RTN scales (fp32) of ``weight`` [out, in] for the scheme: [out] or [out, in / G]."""
    w = weight.detach().to(torch.float32)
    if bits == 8:
        return _safe_scale(w.abs().amax(dim=1), QMAX[8])
    out_f, in_f = w.shape
    g = int(group_size or 0)
    return _safe_scale(w.reshape(out_f, in_f // g, g).abs().amax(dim=2), QMAX[4])


def expand_scales(scales: torch.Tensor, bits: int, group_size: int | None, in_features: int) -> torch.Tensor:
    """Scales broadcast to one per element [out, in]."""
    if bits == 8:
        return scales[:, None].expand(-1, in_features)
    return scales.repeat_interleave(int(group_size or 1), dim=1)


def round_codes(weight: torch.Tensor, full_scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed integer codes round(W / s) clamped to [-qmax, qmax] (int8 tensor)."""
    qmax = QMAX[bits]
    return torch.clamp(torch.round(weight.to(torch.float32) / full_scales), -qmax, qmax).to(torch.int8)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Signed codes [out, in] in [-8, 7] -> uint8 [out, in / 2], offset by 8, even column in the low nibble."""
    if codes.shape[-1] % 2:
        raise FactorlmError(f"pack_int4: the input dimension {codes.shape[-1]} is odd")
    u = (codes.to(torch.int16) + INT4_OFFSET).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 [out, n] -> signed int8 codes [out, 2n]."""
    low = (packed & 0x0F).to(torch.int8) - INT4_OFFSET
    high = (packed >> 4).to(torch.int8) - INT4_OFFSET
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def codes_to_stored(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The tensor written to the checkpoint for signed ``codes``: int8 as is, int4 packed."""
    return codes if bits == 8 else pack_int4(codes)


def stored_to_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    return qweight if bits == 8 else unpack_int4(qweight)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The floating-point weight [out, in] a stored (qweight, scales) pair stands for."""
    codes = stored_to_codes(qweight, bits)
    full = expand_scales(scales.to(torch.float32), bits, group_size, codes.shape[1])
    return (codes.to(torch.float32) * full).to(dtype)


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (stored qweight, fp32 scales) of ``weight`` [out, in]."""
    check_quant_params(bits, group_size, weight.shape[1], "quantize")
    scales = compute_scales(weight, bits, group_size)
    codes = round_codes(weight, expand_scales(scales, bits, group_size, weight.shape[1]), bits)
    return codes_to_stored(codes, bits), scales


def _inverse_gram_cholesky(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1 (fp64), as GPTQ uses it."""
    h = gram.to(torch.float64).clone()
    dead = torch.diag(h) <= 0
    h[dead, dead] = 1.0
    h += damp * torch.mean(torch.diag(h)).clamp(min=1e-12) * torch.eye(h.shape[0], dtype=h.dtype)
    for extra in (0.0, 1e-6, 1e-4, 1e-2):
        try:
            lower = torch.linalg.cholesky(h + extra * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype))
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except RuntimeError:  # not positive definite at this damping: damp more
            continue
    raise FactorlmError("GPTQ: the calibration Gram is not positive definite even after damping")


def quantize_gptq(weight: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int | None = None,
                  damp: float = 0.01, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ error feedback: (stored qweight, fp32 scales) minimising ||X (W - Q)^T|| for ``gram = X^T X``.

    int8 scales are fixed per row from the original weight; int4 scales of a group are
    taken from the error-updated weights when the group's first column is reached.
    """
    out_f, in_f = weight.shape
    check_quant_params(bits, group_size, in_f, "quantize")
    if gram.shape != (in_f, in_f):
        raise FactorlmError(f"GPTQ: Gram {tuple(gram.shape)} does not match the weight's {in_f} input features")
    w = weight.detach().to(torch.float64).clone()
    w[:, torch.diag(gram) <= 0] = 0.0  # inputs that never fire: their weights cannot matter
    hinv = _inverse_gram_cholesky(gram, damp)
    qmax = QMAX[bits]
    g = int(group_size or 0)
    row_scales = compute_scales(w, 8, None).to(torch.float64) if bits == 8 else None
    group_scales = torch.empty(out_f, in_f // g if g else 0, dtype=torch.float64)
    codes = torch.empty(out_f, in_f, dtype=torch.int8)
    for start in range(0, in_f, block):
        end = min(start + block, in_f)
        wb = w[:, start:end].clone()
        errs = torch.zeros_like(wb)
        hb = hinv[start:end, start:end]
        for j in range(end - start):
            col = start + j
            if bits == 8:
                scale = row_scales
            else:
                if col % g == 0:  # a new group: its scale from the current (updated) weights
                    span = torch.cat([wb[:, j:], w[:, end:]], dim=1)[:, :g]
                    group_scales[:, col // g] = _safe_scale(span.abs().amax(dim=1), qmax)
                scale = group_scales[:, col // g]
            q = torch.clamp(torch.round(wb[:, j] / scale), -qmax, qmax)
            codes[:, col] = q.to(torch.int8)
            err = (wb[:, j] - q * scale) / hb[j, j]
            wb[:, j:] -= err[:, None] * hb[j, j:][None, :]
            errs[:, j] = err
        w[:, end:] -= errs @ hinv[start:end, end:]
    scales = (row_scales if bits == 8 else group_scales).to(torch.float32)
    return codes_to_stored(codes, bits), scales


def quantize(weight: torch.Tensor, bits: int, group_size: int | None = None,
             gram: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ when a Gram is given, round-to-nearest otherwise."""
    if gram is None:
        return quantize_rtn(weight, bits, group_size)
    return quantize_gptq(weight, gram, bits, group_size)


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative output error ||X (W - A)^T||_F / ||X W^T||_F computed from the Gram alone."""
    d = (weight - approx).to(torch.float64)
    w = weight.to(torch.float64)
    g = gram.to(torch.float64)
    num = torch.einsum("oi,ij,oj->", d, g, d)
    den = torch.einsum("oi,ij,oj->", w, g, w)
    return math.sqrt(max(num.item(), 0.0) / max(den.item(), 1e-300))


def stored_bytes(bits: int, group_size: int | None, out_features: int, in_features: int) -> int:
    """Bytes a quantized weight takes on disk: integer codes plus fp32 scales."""
    q = out_features * in_features if bits == 8 else out_features * in_features // 2
    return q + 4 * math.prod(scales_shape(bits, group_size, out_features, in_features))
