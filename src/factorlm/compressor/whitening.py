"""Pure math of activation-aware factorization: Gram statistics, whitening, truncated SVD.

Every function takes and returns tensors; orchestration (which layer, which activations)
lives elsewhere. Conventions: a linear layer computes ``y = W x`` with ``W`` [out, in];
activations are given as rows ``X`` [tokens, in]; ``H = Σ x xᵀ`` [in, in].

Methods (see the methods notes, sections 3.1, 3.3, 3.7):

* SVD-LLM: ``H = S Sᵀ`` (Cholesky with damping, eigen fallback), truncate ``W S``, map back
  with ``S⁻¹``. The output error ``‖(W − UV)X‖²`` then equals the sum of the discarded
  squared singular values of ``W S``.
* ASVD: scale input channels by ``mean|x|^α`` before the SVD, undo it on ``V``.
* SAES-SVD (CEALC): with the student Gram ``H`` and the accumulated-error cross statistic
  ``Δ = Σ (x_f − x) xᵀ``, truncate ``G(β) = W (H + βΔ) S⁻ᵀ``; ``β = 0`` is SVD-LLM. ACES picks
  ``β`` on a grid by the retained-energy ratio at the fixed rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..runtime.format import FactorlmError


@dataclass
class Whitening:
    """A square root ``S`` of a Gram matrix (``H ≈ S Sᵀ``) and its inverse.

    ``fallback`` is ``None`` when plain Cholesky (with ``damping``) succeeded, otherwise a
    short text saying which fallback was used, so that reports never hide it.
    """

    sqrt: torch.Tensor
    inv_sqrt: torch.Tensor
    damping: float
    fallback: str | None = None


def accumulate_gram(gram: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Add ``Σ x xᵀ`` of rows ``x`` [..., in] to ``gram`` (fp64), creating it when ``None``."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    update = x2.T @ x2
    return update if gram is None else gram + update


def accumulate_cross(cross: torch.Tensor | None, x_teacher: torch.Tensor, x_student: torch.Tensor) -> torch.Tensor:
    """Add ``Σ (x_f − x) xᵀ`` (the ``Δ`` of CEALC) for paired teacher/student rows (fp64)."""
    xt = x_teacher.reshape(-1, x_teacher.shape[-1]).double()
    xs = x_student.reshape(-1, x_student.shape[-1]).double()
    if xt.shape != xs.shape:
        raise FactorlmError(f"teacher/student activations differ in shape: {tuple(xt.shape)} vs {tuple(xs.shape)}")
    update = (xt - xs).T @ xs
    return update if cross is None else cross + update


def whiten(gram: torch.Tensor, damping: float = 1e-6, rel_floor: float = 1e-10) -> Whitening:
    """Square root of ``gram + damping·mean(diag)·I`` by Cholesky; eigen fallback when it fails.

    The fallback clamps eigenvalues at ``rel_floor·max`` so that singular Grams (dead input
    channels, too few tokens) still give a well-defined, recorded whitening.
    """
    h = gram.double()
    if not torch.isfinite(h).all():
        raise FactorlmError("Gram matrix contains NaN or Inf (non-finite activations)")
    n = h.shape[0]
    scale = float(h.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    damped = h + damping * scale * eye
    chol, info = torch.linalg.cholesky_ex(damped)
    if int(info) == 0:
        inv = torch.linalg.solve_triangular(chol, eye, upper=False)
        if torch.isfinite(inv).all():
            return Whitening(chol, inv, damping)
    evals, evecs = torch.linalg.eigh(h)
    floor = rel_floor * float(evals.max().clamp_min(1e-30))
    clamped = evals.clamp_min(floor)
    sqrt = evecs * clamped.sqrt()
    inv = (evecs / clamped.sqrt()).T
    n_small = int((evals < floor).sum())
    return Whitening(sqrt, inv, damping, fallback=f"eigh (cholesky failed; {n_small}/{n} eigenvalues clamped)")


def truncate(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors ``a`` [out, r], ``b`` [r, in] of ``matrix`` split as ``UΣ^½, Σ^½Vᵀ``.

    Also returns all singular values, so callers can report the discarded energy.
    """
    if rank < 1 or rank > min(matrix.shape):
        raise FactorlmError(f"rank {rank} outside [1, {min(matrix.shape)}] for a {tuple(matrix.shape)} matrix")
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank], s


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain truncated SVD (Eckart–Young in weight space)."""
    a, b, _ = truncate(weight, rank)
    return a, b


def asvd_factors(weight: torch.Tensor, abs_mean: torch.Tensor, rank: int, alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """ASVD: truncate ``W·diag(s)`` with ``s = mean|x|^α`` per input channel, then undo the scaling."""
    s = abs_mean.double().clamp_min(1e-8) ** alpha
    a, b, _ = truncate(weight.double() * s, rank)
    return a, b / s


def saes_target(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor | None, white: Whitening, beta: float) -> torch.Tensor:
    """``G(β) = W (H + βΔ) S⁻ᵀ``; for ``β = 0`` (or no ``Δ``) this is ``W S`` (SVD-LLM)."""
    w = weight.double()
    if beta == 0.0 or cross is None:
        return w @ white.sqrt
    return w @ (gram.double() + beta * cross.double()) @ white.inv_sqrt.T


def saes_factors(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor | None, white: Whitening,
                 rank: int, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CEALC closed form: ``AB = U_r Σ_r V_rᵀ S⁻¹`` of ``G(β)``; returns (a, b, singular values)."""
    a, b, s = truncate(saes_target(weight, gram, cross, white, beta), rank)
    return a, b @ white.inv_sqrt, s


def svdllm_factors(weight: torch.Tensor, white: Whitening, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD-LLM: truncate ``W S`` and map back with ``S⁻¹``; returns (a, b, singular values)."""
    a, b, s = truncate(weight.double() @ white.sqrt, rank)
    return a, b @ white.inv_sqrt, s


def retained_ratio(singular_values: torch.Tensor, rank: int) -> float:
    """ACES criterion ``ρ = Σ_{i≤r} σ_i² / Σ_i σ_i²``."""
    e = singular_values.double() ** 2
    return float(e[:rank].sum() / e.sum().clamp_min(1e-300))


def aces_beta(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor | None, white: Whitening, rank: int,
              grid: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)) -> tuple[float, float]:
    """Pick ``β`` on ``grid`` maximising the retained-energy ratio of ``G(β)``; returns (β, ρ)."""
    best = (0.0, -1.0)
    for beta in grid:
        s = torch.linalg.svdvals(saes_target(weight, gram, cross, white, beta))
        rho = retained_ratio(s, rank)
        if rho > best[1]:
            best = (beta, rho)
    return best


def cealc_objective(approx: torch.Tensor, weight: torch.Tensor, x_student: torch.Tensor, x_teacher: torch.Tensor,
                    alpha: float) -> float:
    """``‖(M − W)X‖² + α‖MX − W X_f‖²`` on rows (the calibration objective of CEALC)."""
    m, w = approx.double(), weight.double()
    xs, xt = x_student.double(), x_teacher.double()
    return float(((xs @ (m - w).T) ** 2).sum() + alpha * ((xs @ m.T - xt @ w.T) ** 2).sum())
