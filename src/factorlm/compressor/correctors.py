"""CALR correctors: a small parallel low-rank path that recovers a layer's functional residual.

A factored layer U(Vx) loses (W - UV)x. The corrector B(Ax) (A: [c, in], B: [out, c]) is
initialised in closed form from the activation-weighted residual (EoRA; by default of the
functional residual, what the layer's output lost on the compressed stream) and then trained on
the functional residual — the layer's output error on calibration activations, a block's
output error against the dense block, or the logits' KL to the dense model. At save time it
folds exactly into the factors: U <- [U | B], V <- [V ; A], so every reader sees plain (U, V).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.factored_linear import CorrectedLinear, FactoredLinear, fold_corrector
from ..runtime.format import FactorlmError

logger = logging.getLogger(__name__)

__all__ = ["CorrectedLinear", "attach_corrector", "corrector_ranks", "distill", "eora_corrector", "fold_corrector",
           "corrector_room", "damped_gram", "functional_residual", "gram_eigh", "kl_distill", "kl_to_teacher", "lr_factor", "residual_energy", "train_layer"]


def gram_eigh(gram: torch.Tensor, rel_floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of an input Gram matrix with eigenvalues floored (EoRA clamps negatives)."""
    evals, evecs = torch.linalg.eigh(gram.double())
    floor = max(float(evals.max()) * rel_floor, 1e-12)
    return evals.clamp_min(floor), evecs


def eora_corrector(residual: torch.Tensor, gram: torch.Tensor, rank: int,
                   eig: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` (A, B) for min ||(R - BA) X||_F given G = X Xᵀ (closed form).

    With G = QΛQᵀ: SVD of R Q Λ^{1/2} = U Σ Vᵀ, B = U_c Σ_c^{1/2}, A = Σ_c^{1/2} V_cᵀ Λ^{-1/2} Qᵀ.
    """
    out_f, in_f = residual.shape
    if not 0 < rank <= min(out_f, in_f):
        raise FactorlmError(f"corrector rank {rank} out of range 1..{min(out_f, in_f)}")
    lam, q = eig if eig is not None else gram_eigh(gram)
    root = lam.sqrt()
    m = residual.double() @ q * root
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    sr = s[:rank].sqrt()
    b = u[:, :rank] * sr
    a = (sr[:, None] * vh[:rank]) / root @ q.T
    return a.to(residual.dtype), b.to(residual.dtype)


def damped_gram(inputs: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """G = XᵀX + δI in float64, δ = ``damp`` x the mean diagonal (the ridge of :func:`functional_residual`)."""
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    gram = x.T @ x
    return gram + damp * float(gram.diagonal().mean()) * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


def functional_residual(inputs: torch.Tensor, output_error: torch.Tensor, damp: float = 0.01,
                        gram: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight-space residual R [out, in] that best explains a layer's output error, and its Gram.

    ``inputs`` X [N, in] are the layer's activations on the compressed (student) stream and
    ``output_error`` E [N, out] = dense output on the dense stream - current output on X. With
    G = XᵀX + δI (δ = ``damp`` x the mean diagonal, a ridge that keeps directions the data barely
    reaches from being amplified), R = Eᵀ X G⁻¹, and :func:`eora_corrector` (R, G) gives the best
    rank-c correction of the *functional* residual, min ||E - X (BA)ᵀ||² + δ||R - BA||². When both
    streams see the same inputs and δ = 0, R is the plain weight residual W - UV (EoRA). When
    the factors were fitted to compensate upstream error (saes), W - UV is not what the output
    lost, and correcting it would undo the compensation; this residual is what it lost.
    ``gram``: :func:`damped_gram` of these inputs, when layers that read the same input share it.
    """
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    err = output_error.reshape(-1, output_error.shape[-1]).double()
    if x.shape[0] != err.shape[0]:
        raise FactorlmError(f"functional residual: {x.shape[0]} input rows but {err.shape[0]} output-error rows")
    if gram is None:
        gram = damped_gram(x, damp)
    elif gram.shape != (x.shape[1], x.shape[1]):
        raise FactorlmError(f"functional residual: Gram {tuple(gram.shape)} does not match {x.shape[1]} input features")
    return torch.linalg.solve(gram, x.T @ err).T, gram


def residual_energy(residual: torch.Tensor, gram: torch.Tensor,
                    eig: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Squared singular values of R G^{1/2}: the functional error each corrector direction can remove."""
    lam, q = eig if eig is not None else gram_eigh(gram)
    return torch.linalg.svdvals(residual.double() @ q * lam.sqrt()) ** 2


def corrector_room(out_features: int, in_features: int, base_rank: int) -> int:
    """The largest corrector rank a factored layer can take: folded, U V stays below full rank and
    stores fewer parameters than the dense layer (past that, dense would be cheaper and exact)."""
    full = min(out_features, in_features) - base_rank
    break_even = (out_features * in_features - 1) // (out_features + in_features) - base_rank
    return max(0, min(full, break_even))


def corrector_ranks(energies: Mapping[str, torch.Tensor], output_energy: Mapping[str, float],
                    costs: Mapping[str, int], budget: int, multiple: int = 8, max_rank: int = 64) -> dict[str, int]:
    """Adaptive corrector ranks from the residual energy.

    Spends ``budget`` parameters one rank step at a time where the step removes the most
    residual energy relative to the layer's dense output energy ||W X||², per parameter.
    ``energies[name]`` = residual_energy(...), ``costs[name]`` = out + in (params per rank).
    """
    ranks = {n: 0 for n in energies}
    totals = {n: max(float(output_energy[n]), 1e-30) for n in energies}
    spent = 0
    while True:
        best, best_gain = None, 0.0
        for n, e in energies.items():
            r = ranks[n]
            step_cost = multiple * costs[n]
            if r + multiple > min(max_rank, len(e)) or spent + step_cost > budget:
                continue
            gain = float(e[r:r + multiple].sum()) / totals[n] / step_cost
            if gain > best_gain:
                best, best_gain = n, gain
        if best is None:
            return ranks
        ranks[best] += multiple
        spent += multiple * costs[best]


def attach_corrector(base: FactoredLinear, a: torch.Tensor, b: torch.Tensor, train_base: bool = False) -> CorrectedLinear:
    """``base`` with corrector (A, B) beside it; the factors train too only when ``train_base``."""
    layer = CorrectedLinear.from_base(base, a, b)
    for p in layer.factor_parameters():
        p.requires_grad_(train_base)
    return layer


def train_layer(layer: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, steps: int = 100, lr: float = 1e-3,
                batch: int = 512, seed: int = 0) -> list[float]:
    """Fit a layer's trainable parameters to reproduce ``targets`` from ``inputs`` (MSE); returns losses.

    The functional residual of one layer: inputs are its calibration activations [N, in],
    targets the dense layer's outputs [N, out]. Losses are relative (÷ mean square target).
    """
    params = [p for p in layer.parameters() if p.requires_grad]
    if not params:
        raise FactorlmError("train_layer: the layer has no trainable parameters")
    opt = torch.optim.Adam(params, lr=lr)
    scale = targets.pow(2).mean().clamp_min(1e-12)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, inputs.shape[0], (min(batch, inputs.shape[0]),), generator=gen)
        loss = F.mse_loss(layer(inputs[idx]), targets[idx]) / scale
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def kl_to_teacher(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, averaged over the batch's tokens."""
    logp = student_logits.float().log_softmax(-1)
    return F.kl_div(logp.flatten(0, 1), teacher_logprobs.flatten(0, 1), log_target=True, reduction="batchmean")


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% of the peak at the last step."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(steps - warmup - 1, 1)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


def kl_distill(student: nn.Module, batches: Sequence[torch.Tensor], teacher: Callable[[int], torch.Tensor],
               params: list[nn.Parameter], steps: int, lr: float = 1e-4, *, warmup: int = 0, clip: float | None = None,
               on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Minimise KL(teacher ‖ student) on the logits, cycling over ``batches``; returns the losses.

    ``teacher(i)`` gives the teacher's log-probabilities for ``batches[i]`` (precomputed or
    computed on the fly). Adam with warm-up and cosine decay (see :func:`lr_factor`) when
    ``warmup`` > 0, constant ``lr`` otherwise; ``clip`` bounds the gradient norm.
    """
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for step in range(steps):
        i = step % len(batches)
        if warmup:
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor(step, steps, warmup)
        loss = kl_to_teacher(student(input_ids=batches[i]).logits, teacher(i))
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        losses.append(loss.item())
        if on_step:
            on_step(step, losses[-1])
    return losses


def distill(student: nn.Module, batches: Iterable[torch.Tensor], teacher_logprobs: list[torch.Tensor],
            params: list[nn.Parameter], steps: int, lr: float = 1e-4,
            on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """End-to-end pass: minimise KL(teacher ‖ student) on the logits of calibration batches."""
    return kl_distill(student, list(batches), teacher_logprobs.__getitem__, params, steps, lr=lr, on_step=on_step)
