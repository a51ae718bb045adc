"""Factorization methods behind one registry, selected by ``--method``.

Each method turns a dense weight and the statistics of the layer's calibration inputs into
factors ``(u [out, r], v [r, in])`` plus report fields. Statistics come from the block-wise
streaming compressor (:mod:`.streaming`): the Gram ``H`` and mean ``|x|`` of the layer's
inputs on the *student* stream (the model compressed so far) and, for ``saes``, the cross
statistic ``Δ = Σ (x_teacher − x_student) x_studentᵀ``.

* ``svd``: plain truncated SVD, no calibration.
* ``asvd``: activation-scaled SVD (input channels scaled by ``mean|x|^0.5``).
* ``svd-llm``: whitening by the Cholesky factor of ``H`` (eigen fallback, recorded).
* ``saes``: SAES-SVD, the CEALC closed form ``G(β) = W (H + βΔ) S⁻ᵀ`` with ACES choosing
  ``β`` per layer on a grid by the retained-energy ratio; ``β = 0`` is ``svd-llm``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..runtime.format import FactorlmError
from .whitening import Whitening, asvd_factors, retained_ratio, svd_factors, truncate, whiten

logger = logging.getLogger(__name__)

ACES_GRID: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class InputStats:
    """Calibration statistics of one linear's inputs (shared by linears that read the same input).

    ``gram`` / ``cross`` are fp64 sums over ``count`` tokens; ``abs_sum`` is Σ|x| per input
    channel. ``white`` caches the whitening of ``gram`` (one Cholesky per input group).
    ``parts`` holds the same statistics of two disjoint halves of the calibration batches
    (even / odd), for choosing saes' β on data the fit has not seen.
    """

    gram: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    count: int = 0
    white: Whitening | None = field(default=None, repr=False)
    parts: list["InputStats"] = field(default_factory=list, repr=False)

    def whitening(self, damping: float) -> Whitening:
        """Whitening of the Gram, computed once and cached."""
        if self.gram is None:
            raise FactorlmError("no calibration statistics were collected for this layer")
        if self.white is None:
            self.white = whiten(self.gram, damping=damping)
            if self.white.fallback:
                logger.warning("whitening fallback: %s", self.white.fallback)
        return self.white


ACES_CRITERIA = ("holdout", "energy")


@dataclass(frozen=True)
class MethodOptions:
    """Knobs shared by the methods: whitening damping, the ACES grid and criterion, a fixed β.

    ``aces`` picks how saes chooses β per layer: ``energy`` is the paper's ACES (the largest
    retained-energy ratio of ``G(β)``); ``holdout`` fits ``G(β)`` on one half of the
    calibration batches and keeps the β whose factorization best reproduces the *teacher's*
    layer output on the other half (the quantity the anchor term is for), so a β that only
    fits noise in ``Δ`` is not chosen.
    """

    damping: float = 1e-6
    beta: float | None = None
    grid: tuple[float, ...] = ACES_GRID
    aces: str = "holdout"


@dataclass(frozen=True)
class Method:
    """A factorization method: what it needs from the streams and how it factorizes."""

    name: str
    needs_calibration: bool
    needs_teacher: bool
    factorize: Callable[[torch.Tensor, InputStats | None, int, MethodOptions],
                        tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]
    description: str = ""


def spectrum_energy(matrix: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Squared singular values of ``matrix`` (descending), via the smaller Gram's eigenvalues.

    Cheaper than an SVD for tall or wide matrices and accurate enough for energy ratios.
    """
    m = matrix.to(dtype)
    small = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return torch.linalg.eigvalsh(small).flip(0).clamp_min(0.0)


def aces_select(base: torch.Tensor, direction: torch.Tensor, rank: int,
                grid: tuple[float, ...]) -> tuple[float, float]:
    """ACES: the β on ``grid`` maximising the retained-energy ratio of ``G(β) = base + β·direction``.

    Ties keep the smaller β (closer to the svd-llm solution). The search runs in fp32 (a
    ratio of energies needs no more); the final truncation is fp64. Returns (β, ratio).
    """
    base32, dir32 = base.float(), direction.float()
    cache: dict[float, float] = {}

    def rho(beta: float) -> float:
        if beta not in cache:
            cache[beta] = retained_ratio(spectrum_energy(base32 + beta * dir32, torch.float32).double(), rank)
        return cache[beta]

    # coarse-to-fine: every third grid point, then the neighbours of the best one (the same
    # answer as the full grid when ρ(β) is unimodal on it, in about half the eigen-solves)
    points = sorted(grid)
    coarse = points[::3] if len(points) > 4 else points
    best = max(coarse, key=lambda b: (rho(b), -b))
    i = points.index(best)
    for b in points[max(0, i - 2): i + 3]:
        rho(b)
    best = max(cache, key=lambda b: (cache[b], -b))
    return float(best), cache[best]


def anchored_error(approx: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor) -> float:
    """``Σ ‖M x − W x_f‖² − Σ ‖W x_f‖²`` from ``H = Σ x xᵀ`` and ``Δ = Σ (x_f − x) xᵀ`` (student x, teacher x_f).

    With ``C = Σ x_f xᵀ = Δ + H``: ``tr(M H Mᵀ) − 2 Σ M ⊙ (W C)``; the constant teacher
    energy is left out, so only differences between candidates are meaningful.
    """
    m = approx.float()
    h = gram.float()
    c = (gram + cross).float()
    return float(((m @ h) * m).double().sum() - 2 * (m * (weight.float() @ c)).double().sum())


def _truncated_map(target: torch.Tensor, inv_sqrt: torch.Tensor, rank: int) -> torch.Tensor:
    """``U_r Σ_r V_rᵀ S⁻¹`` of a target (the direct form of a candidate; tests compare against it)."""
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ (vh[:rank] @ inv_sqrt.to(target.dtype))


def _sym(a: torch.Tensor) -> torch.Tensor:
    return a + a.T


def holdout_errors(weight: torch.Tensor, white: Whitening, fit_cross: torch.Tensor, held_gram: torch.Tensor,
                   held_cross: torch.Tensor, rank: int, dtype: torch.dtype = torch.float32
                   ) -> Callable[[float], float]:
    """``β ↦ anchored_error(P_r(T(β)) S⁻¹, W, H_h, Δ_h)`` with ``T(β) = W S + β W Δ_f S⁻ᵀ``, cheaply.

    The rank-``r`` truncation ``P_r`` is a projection onto the top eigenvectors of the smaller
    Gram of ``T(β)``, which is quadratic in β, and both terms of the anchored error are traces
    of that projection against matrices also polynomial in β. So a few products are formed
    once, and each candidate β costs one symmetric eigen-solve of the smaller side instead of an
    SVD and two products with the ``[in, in]`` held-out statistics. In ``dtype`` (fp32 is plenty
    to rank candidates; the chosen β's factorization is computed in fp64).
    """
    w = weight.to(dtype)
    si = white.inv_sqrt.to(dtype)
    base = w @ white.sqrt.to(dtype)
    direction = (w @ fit_cross.to(dtype)) @ si.T
    gs = (w @ (held_gram + held_cross).to(dtype)) @ si.T  # W C_h S⁻ᵀ
    m, n = w.shape
    if m <= n:  # P_r(T) = U Uᵀ T, U: top eigenvectors of T Tᵀ   [m, m]
        a1 = direction @ si  # T S⁻¹ = W + β a1
        h = held_gram.to(dtype)
        wh, ah = w @ h, a1 @ h
        quad = (wh @ w.T, _sym(wh @ a1.T), ah @ a1.T)
        lin = (_sym(base @ gs.T), _sym(direction @ gs.T))
        gram = (base @ base.T, _sym(base @ direction.T), direction @ direction.T)

        def err(beta: float) -> float:
            _, u = torch.linalg.eigh(gram[0] + beta * gram[1] + beta**2 * gram[2])
            u = u[:, -rank:]
            k = quad[0] + beta * quad[1] + beta**2 * quad[2] - (lin[0] + beta * lin[1])  # lin is R + Rᵀ
            return float(((k @ u) * u).double().sum())
    else:  # P_r(T) = T V Vᵀ, V: top eigenvectors of Tᵀ T   [n, n]
        h_hat = si @ held_gram.to(dtype) @ si.T
        lin = (_sym(base.T @ gs), _sym(direction.T @ gs))
        gram = (base.T @ base, _sym(base.T @ direction), direction.T @ direction)

        def err(beta: float) -> float:
            lam, v = torch.linalg.eigh(gram[0] + beta * gram[1] + beta**2 * gram[2])
            lam, v = lam[-rank:], v[:, -rank:]
            quad_term = (lam.double() * ((h_hat @ v) * v).double().sum(0)).sum()
            lin_term = (((lin[0] + beta * lin[1]) @ v) * v).double().sum() / 2
            return float(quad_term - 2 * lin_term)
    return err


def aces_holdout(weight: torch.Tensor, fit: InputStats, held: InputStats, rank: int, grid: tuple[float, ...],
                 damping: float) -> tuple[float, float]:
    """β on ``grid`` whose CEALC solution fitted on ``fit`` has the lowest anchored error on ``held``.

    Coarse-to-fine as in :func:`aces_select`. Returns (β, relative anchored-error change vs β = 0
    on the held-out half: negative means β helps).
    """
    if fit.gram is None or held.gram is None or fit.cross is None or held.cross is None:
        return 0.0, 0.0
    white = fit.whitening(damping)
    teacher = float(((weight.double() @ (held.gram + held.cross).double() @ weight.double().T).trace()))
    error_of = holdout_errors(weight, white, fit.cross, held.gram, held.cross, rank)
    cache: dict[float, float] = {}

    def err(beta: float) -> float:
        if beta not in cache:
            cache[beta] = error_of(beta)
        return cache[beta]

    points = sorted(grid)
    coarse = points[::3] if len(points) > 4 else points
    best = min(coarse, key=lambda b: (err(b), b))
    i = points.index(best)
    for b in points[max(0, i - 2): i + 3]:
        err(b)
    best = min(cache, key=lambda b: (cache[b], b))
    zero = err(0.0) if 0.0 in points else cache[best]
    # errors are offsets from -Σ‖W x_f‖²-like constants; compare on the scale of the teacher energy
    return float(best), (cache[best] - zero) / max(abs(teacher), 1e-30)


def _svd(weight: torch.Tensor, stats: InputStats | None, rank: int, opts: MethodOptions
         ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    u, v = svd_factors(weight, rank)
    return u, v, {}


def _asvd(weight: torch.Tensor, stats: InputStats | None, rank: int, opts: MethodOptions
          ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    if stats is None or stats.abs_sum is None or stats.count == 0:
        raise FactorlmError("asvd needs calibration statistics (mean |x| per input channel)")
    u, v = asvd_factors(weight, stats.abs_sum / stats.count, rank)
    return u, v, {}


def _svdllm(weight: torch.Tensor, stats: InputStats | None, rank: int, opts: MethodOptions
            ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    if stats is None:
        raise FactorlmError("svd-llm needs calibration statistics (input Gram)")
    white = stats.whitening(opts.damping)
    a, b, _ = truncate(weight.double() @ white.sqrt, rank)
    return a, b @ white.inv_sqrt, {"fallback": white.fallback}


def _saes(weight: torch.Tensor, stats: InputStats | None, rank: int, opts: MethodOptions
          ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    if stats is None or stats.gram is None:
        raise FactorlmError("saes needs calibration statistics (input Gram and teacher/student cross statistic)")
    white = stats.whitening(opts.damping)
    w = weight.double()
    base = w @ white.sqrt  # G(0) = W S, the svd-llm target
    if stats.cross is None:
        beta, rho = 0.0, None
        target = base
    else:
        # dG/dβ = W Δ S⁻ᵀ; fp32 is plenty for a correction term and halves the cost of the matmuls
        direction = ((weight.float() @ stats.cross.float()) @ white.inv_sqrt.float().T).double()
        extra: dict[str, Any] = {}
        if opts.beta is not None:
            beta, rho = float(opts.beta), None
        elif opts.aces == "holdout" and len(stats.parts) == 2:
            beta, gain = aces_holdout(weight, stats.parts[0], stats.parts[1], rank, opts.grid, opts.damping)
            rho = None
            extra["holdout_gain"] = round(gain, 6)
        elif opts.aces in ACES_CRITERIA:
            beta, rho = aces_select(base, direction, rank, opts.grid)
        else:
            raise FactorlmError(f"unknown ACES criterion {opts.aces!r}; available: {', '.join(ACES_CRITERIA)}")
        target = base + beta * direction
    a, b, s = truncate(target, rank)
    if rho is None:
        rho = retained_ratio(s, rank)
    return a, b @ white.inv_sqrt, {"beta": beta, "retained": round(rho, 6), "fallback": white.fallback,
                                   **(extra if stats.cross is not None else {})}


METHODS: dict[str, Method] = {
    "svd": Method("svd", False, False, _svd, "plain truncated SVD of the weight"),
    "asvd": Method("asvd", True, False, _asvd, "activation-scaled SVD (mean |x|^0.5 per input channel)"),
    "svd-llm": Method("svd-llm", True, False, _svdllm, "SVD of the weight whitened by the input Gram"),
    "saes": Method("saes", True, True, _saes, "SAES-SVD: CEALC with the accumulated-error statistic, ACES beta"),
}


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name lists the available ones."""
    if name not in METHODS:
        raise FactorlmError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor | None) -> float | None:
    """Relative output error ``‖(W − M)X‖_F / ‖WX‖_F`` on the calibration inputs, from ``H = XXᵀ``."""
    if gram is None:
        return None
    w = weight.float()
    e = w - approx.float()
    h = gram.float()
    num = float(((e @ h) * e).double().sum().clamp_min(0.0))
    den = float(((w @ h) * w).double().sum().clamp_min(1e-300))
    return (num / den) ** 0.5
