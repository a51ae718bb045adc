"""Weight quantization math for factors and dense weights (pure functions, no I/O).

Two schemes, both with no zero point, both along the *input* dimension of a weight W
[out, in] so that every output channel is scaled on its own; the stored value is always
exactly ``code * scale``:

- **int8, per output channel**: one scale per row, codes in [-128, 127], stored as ``int8``
  [out, in].
- **int4, group-wise**: groups of ``group_size`` consecutive input columns share a scale,
  codes in [-8, 7]; stored *offset by 8* as unsigned nibbles (0..15) packed two per
  ``uint8`` [out, in / 2], the even column in the low nibble. That is ONNX Runtime's
  MatMulNBits layout (zero point 8), so the exporter hands the stored bytes over unchanged.

Scales are signed (:func:`search_scales`): the candidates map the element of largest
magnitude in a row/group onto the most negative code (so int4's 16th level, -8, is used)
or onto the most positive one, and the one with the lower (importance-weighted) squared
error is kept. GPTQ also searches a clipping grid weighted by the Gram's diagonal: the
whitened V factors have rows whose peak is a 1000x outlier on inputs that barely fire, and
clipping it gives every other weight of the row a fine step (plain-MSE clipping without
the Gram raised perplexity on the sample model, so RTN does not clip;
``benchmarks/results/quant.md``).

Rounding is round-to-nearest (RTN) unless an input Gram ``H = X^T X`` of the layer is
given: then GPTQ-style error feedback (Frantar et al., 2022) quantizes one column at a
time and spreads its rounding error onto the columns not yet quantized, weighted by the
inverse Gram, which minimises the layer's *output* error ``||X (W - Q)^T||`` rather than
the weight error. Columns go in decreasing ``diag(H)`` order (act-order), with scales
fixed from the original weight beforehand so that the groups stay contiguous in storage.

For a factored layer, :func:`balance_factors` first rescales U's columns and V's rows by
the inverse of each other (``U V`` unchanged) so that every rank channel of U has the same
range, which an int4 group along the rank needs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .format import FactorlmError

SUPPORTED_BITS = (4, 8)
QMAX = {8: 127, 4: 7}
QMIN = {8: -128, 4: -8}
INT4_OFFSET = 8
# clipping ratios tried per row (int8) / group (int4): fine steps near 1 (plain absmax),
# then log-spaced down to 1e-3, so that a row whose peak is an unimportant outlier 1000x
# its typical weight (whitened V factors have them) can still get a fine step
_FINE = tuple(1.0 - 0.02 * i for i in range(10))
CLIP_GRID = {b: _FINE + tuple(0.8 * (1e-3 / 0.8) ** (i / 39) for i in range(40)) for b in (4, 8)}


@dataclass(frozen=True)
class QuantOptions:
    """How codes are chosen (not how they are stored): every choice dequantizes as ``code * scale``.

    ``clip`` (GPTQ only): search a clipping ratio per row/group, the error weighted by the
    Gram's diagonal (RTN has no data and keeps absmax scales); ``act_order``: GPTQ
    in decreasing ``diag(H)`` order with scales fixed beforehand; ``balance``: equalize U's
    rank channels before quantizing a factored layer (:func:`balance_factors`); ``refit_u``
    (GPTQ only): before U is quantized, refit it by least squares to the quantized V
    (:func:`refit_u`), so U's codes also absorb V's rounding error; ``sequential`` (GPTQ only,
    applied by the checkpoint quantizer): each decoder block's Grams are taken on the hidden
    states the already quantized blocks produce, as GPTQ does, rather than all from one pass
    of the unquantized model.
    """

    clip: bool = True
    act_order: bool = True
    balance: bool = False
    refit_u: bool = True
    sequential: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    return torch.where(scale != 0, scale, torch.ones_like(scale))


def _grouped(weight: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """``weight`` [out, in] viewed as [out, groups, group]: one group per row for int8."""
    out_f, in_f = weight.shape
    g = in_f if bits == 8 else int(group_size or 0)
    return weight.reshape(out_f, in_f // g, g)


def search_scales(weight: torch.Tensor, bits: int, group_size: int | None,
                  importance: torch.Tensor | None = None, clip: bool = False) -> torch.Tensor:
    """Signed scales [out] (int8) or [out, in / G] (int4) minimising the rounding error of each row/group.

    Candidates: ``m * c / QMIN`` and ``m * c / QMAX`` for the group's largest-magnitude
    element ``m`` and each clipping ratio ``c`` of :data:`CLIP_GRID` (just ``c = 1`` when
    ``clip`` is False); the error of a candidate is ``sum_j importance_j (w_j - q_j s)^2``
    with ``importance`` [in] (e.g. the Gram's diagonal; all ones when None).
    """
    wg = _grouped(weight.detach().to(torch.float64), bits, group_size)
    imp = torch.ones(wg.shape[1] * wg.shape[2], dtype=wg.dtype) if importance is None else importance.to(wg.dtype)
    imp = imp.clamp(min=0).reshape(1, wg.shape[1], wg.shape[2])
    idx = wg.abs().argmax(dim=2, keepdim=True)
    peak = torch.gather(wg, 2, idx).squeeze(2)  # signed element of largest magnitude
    best_err = torch.full(peak.shape, float("inf"), dtype=wg.dtype)
    best = _safe_scale(peak, QMIN[bits])
    for ratio in CLIP_GRID[bits] if clip else (1.0,):
        for level in (QMIN[bits], QMAX[bits]):
            scale = _safe_scale(peak * ratio, level)
            q = torch.clamp(torch.round(wg / scale[..., None]), QMIN[bits], QMAX[bits])
            err = (imp * (wg - q * scale[..., None]) ** 2).sum(dim=2)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, scale, best)
    best = best.to(torch.float32)
    return best.squeeze(1) if bits == 8 else best


def compute_scales(weight: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Scales (fp32) of ``weight`` [out, in], no clipping: [out] or [out, in / G]."""
    return search_scales(weight, bits, group_size)


def expand_scales(scales: torch.Tensor, bits: int, group_size: int | None, in_features: int) -> torch.Tensor:
    """Scales broadcast to one per element [out, in]."""
    if bits == 8:
        return scales[:, None].expand(-1, in_features)
    return scales.repeat_interleave(int(group_size or 1), dim=1)


def round_codes(weight: torch.Tensor, full_scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed integer codes round(W / s) clamped to [QMIN, QMAX] (int8 tensor)."""
    return torch.clamp(torch.round(weight.to(full_scales.dtype) / full_scales), QMIN[bits], QMAX[bits]).to(torch.int8)


def balance_factors(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U diag(s), diag(1/s) V)`` with ``s`` giving every column of U the same largest magnitude.

    The product is unchanged (up to fp rounding); U's groups run along the rank, so columns
    of very different ranges (``U Σ^½`` decays with the singular values) would share one
    int4 scale. ``s`` is normalised to geometric mean 1 so magnitudes stay where they were.
    """
    peak = u.detach().to(torch.float64).abs().amax(dim=0)
    live = peak > 0
    s = torch.ones_like(peak)
    if live.any():
        s[live] = torch.exp(torch.log(peak[live]).mean()) / peak[live]
    return (u.to(torch.float64) * s).to(u.dtype), (v.to(torch.float64) / s[:, None]).to(v.dtype)


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


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int | None = None, clip: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest with searched scales: (stored qweight, fp32 scales) of ``weight`` [out, in]."""
    check_quant_params(bits, group_size, weight.shape[1], "quantize")
    scales = search_scales(weight, bits, group_size, clip=clip)
    codes = round_codes(weight, expand_scales(scales, bits, group_size, weight.shape[1]), bits)
    return codes_to_stored(codes, bits), scales


def refit_u(u: torch.Tensor, v: torch.Tensor, vq: torch.Tensor, gram: torch.Tensor, damp: float = 1e-4
            ) -> torch.Tensor:
    """``argmin_U' ||X V^T U^T - X Vq^T U'^T||`` = ``U (V H Vq^T)(Vq H Vq^T)^-1`` for ``H = X^T X`` (fp64).

    The U that best reproduces the layer's output once V is replaced by its quantized
    ``vq``; ``damp`` (relative to the mean diagonal) keeps the solve well posed.
    """
    h = gram.to(torch.float64)
    v64, vq64 = v.to(torch.float64), vq.to(torch.float64)
    lhs = vq64 @ h @ vq64.T
    lhs = lhs + damp * torch.diagonal(lhs).mean().clamp(min=1e-300) * torch.eye(lhs.shape[0], dtype=lhs.dtype)
    cross = v64 @ h @ vq64.T
    return torch.linalg.solve(lhs, (u.to(torch.float64) @ cross).T).T.to(u.dtype)


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
                  damp: float = 0.01, block: int = 128, act_order: bool = True, clip: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ error feedback: (stored qweight, fp32 scales) minimising ||X (W - Q)^T|| for ``gram = X^T X``.

    With ``act_order`` the columns are processed in decreasing ``diag(H)`` order and every
    scale is searched beforehand on the original weight (weighted by ``diag(H)``); without
    it the columns go left to right and an int4 group's scale is searched on the
    error-updated weights when its first column is reached (int8 row scales are always
    searched on the original weight). ``block`` columns are updated lazily at a time.
    """
    out_f, in_f = weight.shape
    check_quant_params(bits, group_size, in_f, "quantize")
    if gram.shape != (in_f, in_f):
        raise FactorlmError(f"GPTQ: Gram {tuple(gram.shape)} does not match the weight's {in_f} input features")
    diag = torch.diag(gram).to(torch.float64)
    w = weight.detach().to(torch.float64).clone()
    w[:, diag <= 0] = 0.0  # inputs that never fire: their weights cannot matter
    dynamic = bits == 4 and not act_order
    g = int(group_size or 0)
    scales = (torch.empty(out_f, in_f // g, dtype=torch.float64) if dynamic
              else search_scales(w, bits, group_size, diag, clip).to(torch.float64))
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(in_f)
    full = None if dynamic else expand_scales(scales, bits, group_size, in_f)[:, perm].contiguous()
    w = w[:, perm]
    hinv = _inverse_gram_cholesky(gram[perm][:, perm], damp)
    codes = torch.empty(out_f, in_f, dtype=torch.int8)
    for start in range(0, in_f, block):
        end = min(start + block, in_f)
        wb = w[:, start:end].clone()
        errs = torch.zeros_like(wb)
        hb = hinv[start:end, start:end]
        for j in range(end - start):
            col = start + j
            if full is not None:
                scale = full[:, col]
            else:
                if col % g == 0:  # a new group: its scale from the current (updated) weights
                    span = torch.cat([wb[:, j:], w[:, end:]], dim=1)[:, :g]
                    scales[:, col // g] = search_scales(span, 4, g, diag[col:col + g], clip)[:, 0]
                scale = scales[:, col // g]
            q = torch.clamp(torch.round(wb[:, j] / scale), QMIN[bits], QMAX[bits])
            codes[:, col] = q.to(torch.int8)
            err = (wb[:, j] - q * scale) / hb[j, j]
            wb[:, j:] -= err[:, None] * hb[j, j:][None, :]
            errs[:, j] = err
        w[:, end:] -= errs @ hinv[start:end, end:]
    codes = codes[:, torch.argsort(perm)]
    return codes_to_stored(codes, bits), scales.to(torch.float32)


def quantize(weight: torch.Tensor, bits: int, group_size: int | None = None,
             gram: torch.Tensor | None = None, options: QuantOptions | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ when a Gram is given, round-to-nearest otherwise."""
    opts = options or QuantOptions()
    if gram is None:
        return quantize_rtn(weight, bits, group_size)
    return quantize_gptq(weight, gram, bits, group_size, act_order=opts.act_order, clip=opts.clip)


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
