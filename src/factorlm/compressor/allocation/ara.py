"""ARA: adaptive rank allocation with a trainable monotone mask (arXiv 2510.19389).

Each layer's weight is written in its (whitened) singular basis, W = L diag(mask) R with
L = U Σ and R = Vᵀ S⁻¹, so mask = 1 reproduces W exactly. The mask is the survival function
of a learned distribution over ranks: p = softmax(θ), m_j = Σ_{i≥j} p_i. It is therefore
monotone non-increasing in j by construction, every θ_i receives gradient from the whole
spectrum, and the expected rank is E[k] = Σ_j m_j.

Training minimises, on calibration text,
    KL(dense teacher ‖ masked student)                      (task loss, logits)
  + w_budget · relu(cost / budget - 1)²                       (budget loss)
  + w_guide  · Σ_{layers past break-even} (1 - mean m)        (guidance: fall back to dense)
where a layer's cost is min(E[k]·(m+n), m·n): past break-even a layer is kept dense, so the
guidance term pushes such layers all the way to full rank instead of leaving them stuck
"almost dense but factored". Ranks are read off E[k] afterwards and projected onto the budget.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .core import LayerSpectrum, Plan, allocate_greedy, check_budget, plan_cost

logger = logging.getLogger(__name__)


def monotone_mask(theta: torch.Tensor) -> torch.Tensor:
    """m_j = Σ_{i≥j} softmax(θ)_i: non-increasing in j, m_0 = 1, values in (0, 1]."""
    p = torch.softmax(theta, dim=-1)
    return torch.flip(torch.cumsum(torch.flip(p, (-1,)), -1), (-1,))


def expected_rank(theta: torch.Tensor) -> torch.Tensor:
    """E[k] = Σ_j m_j for the rank distribution softmax(θ) over ranks 1..K."""
    return monotone_mask(theta).sum(-1)


def init_theta(k: int, rank: int, sharpness: float = 4.0) -> torch.Tensor:
    """Logits whose rank distribution peaks at ``rank`` (a warm start from a training-free plan)."""
    ranks = torch.arange(1, k + 1, dtype=torch.float32)
    return -sharpness * ((ranks - rank) / max(k, 1) * 8).abs()


class MaskedFactors(nn.Module):
    """y = L diag(mask) R x + b with a trainable monotone mask; L, R and b are frozen."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None, theta: torch.Tensor):
        super().__init__()
        self.register_buffer("left", left)
        self.register_buffer("right", right)
        self.register_buffer("bias_", bias if bias is not None else None)
        self.theta = nn.Parameter(theta.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(x, self.right) * monotone_mask(self.theta)
        return F.linear(z, self.left, self.bias_)


@dataclass
class AraConfig:
    """Training knobs; defaults fit a 135M model in minutes on two CPU cores."""

    steps: int = 30
    lr: float = 0.05
    w_budget: float = 10.0
    w_guide: float = 0.1
    guide_fraction: float = 0.9
    seed: int = 0


def layer_cost(expected: torch.Tensor, shape_m: int, shape_n: int) -> torch.Tensor:
    """Differentiable parameter cost with the dense fallback: min(E[k](m+n), mn)."""
    return torch.minimum(expected * (shape_m + shape_n), torch.tensor(float(shape_m * shape_n)))


def ara_losses(
    masks: Mapping[str, MaskedFactors], spectra: Mapping[str, LayerSpectrum], budget: int, cfg: AraConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(budget loss, guidance loss, total expected cost) of the current masks."""
    costs, guide = [], []
    for name, module in masks.items():
        shape = spectra[name].shape
        e = expected_rank(module.theta)
        costs.append(layer_cost(e, shape.out_features, shape.in_features))
        if float(e.detach()) * (shape.out_features + shape.in_features) > cfg.guide_fraction * shape.dense_params:
            guide.append(1.0 - monotone_mask(module.theta).mean())
    cost = torch.stack(costs).sum()
    budget_loss = F.relu(cost / budget - 1.0) ** 2
    guide_loss = torch.stack(guide).sum() if guide else torch.zeros(())
    return budget_loss, guide_loss, cost


def read_plan(masks: Mapping[str, MaskedFactors], spectra: Mapping[str, LayerSpectrum], budget: int,
              multiple: int, min_rank: int) -> Plan:
    """Ranks from the trained masks, projected onto the budget.

    The trained masks define a score per singular direction (its mask value); the final
    plan is the greedy allocation over spectra re-weighted by those scores, so it is
    deterministic and meets the budget exactly as the other allocators do.
    """
    weighted = {}
    for name, s in spectra.items():
        m = monotone_mask(masks[name].theta).detach().double()
        weighted[name] = LayerSpectrum(s.name, s.shape, s.energy.double() * m, s.sublayer)
    return allocate_greedy(weighted, budget, multiple, min_rank)


def train_ara(
    model: nn.Module,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    spectra: Mapping[str, LayerSpectrum],
    budget: int,
    batches: Iterable[torch.Tensor],
    cfg: AraConfig | None = None,
    multiple: int = 8,
    min_rank: int = 8,
    progress: bool = True,
) -> tuple[Plan, list[dict[str, float]]]:
    """Train masks on calibration batches, return (plan, loss history). ``model`` is restored.

    ``factors[name] = (L [m, k], R [k, n], bias)`` with L R = W. The dense model is the
    teacher; its logits are computed once per batch before the layers are swapped.
    """
    cfg = cfg or AraConfig()
    check_budget(spectra, budget, multiple, min_rank)
    torch.manual_seed(cfg.seed)
    start_plan = allocate_greedy(spectra, budget, multiple, min_rank)
    batches = list(batches)
    with torch.no_grad():
        teacher = [model(input_ids=b).logits.float().log_softmax(-1) for b in batches]
    originals: dict[str, nn.Module] = {}
    masks: dict[str, MaskedFactors] = {}
    for name, (left, right, bias) in factors.items():
        k = left.shape[1]
        r0 = start_plan[name] or k
        masks[name] = MaskedFactors(left, right, bias, init_theta(k, r0))
        parent, _, child = name.rpartition(".")
        originals[name] = model.get_submodule(parent).get_submodule(child)
        setattr(model.get_submodule(parent), child, masks[name])
    frozen = [p for p in model.parameters() if not any(p is m.theta for m in masks.values())]
    flags = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    history: list[dict[str, float]] = []
    try:
        opt = torch.optim.Adam([m.theta for m in masks.values()], lr=cfg.lr)
        bar = tqdm(range(cfg.steps), desc="ara masks", unit="step", disable=not progress)
        for step in bar:
            i = step % len(batches)
            logp = model(input_ids=batches[i]).logits.float().log_softmax(-1)
            task = F.kl_div(logp, teacher[i], log_target=True, reduction="batchmean") / batches[i].shape[1]
            budget_loss, guide_loss, cost = ara_losses(masks, spectra, budget, cfg)
            loss = task + cfg.w_budget * budget_loss + cfg.w_guide * guide_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            row = {"step": step, "task": task.item(), "budget": budget_loss.item(), "guide": guide_loss.item(),
                   "cost_ratio": cost.item() / budget}
            history.append(row)
            bar.set_postfix(kl=f"{row['task']:.4f}", cost=f"{row['cost_ratio']:.3f}")
        plan = read_plan(masks, spectra, budget, multiple, min_rank)
    finally:
        for name, module in originals.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module)
        for p, flag in zip(frozen, flags):
            p.requires_grad_(flag)
    logger.info("ara: plan keeps %d of %d budgeted parameters", plan_cost(spectra, plan), budget)
    if history and not math.isfinite(history[-1]["task"]):
        logger.warning("ara: non-finite loss; the plan fell back to the greedy allocation")
        return start_plan, history
    return plan, history
