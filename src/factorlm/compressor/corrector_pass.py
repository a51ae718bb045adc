"""The corrector step of the block-wise compressor (CALR): initialise, train, fold.

Per block, after its linears are factorized:

1. every factored linear gets a corrector ``B(Ax)`` whose rank comes from the residual
   energy (``auto``, within the parameters reserved for correctors) or is fixed;
2. the corrector starts from the closed-form EoRA compensation of the whitened residual (by
   default the functional one: what the layer's output lost on the compressed stream);
3. it is trained on the functional residual: first per layer (the dense layer's output on
   the teacher stream is the target for the layer's input on the student stream), then per
   block (the dense block on the teacher stream is the target of the compressed block on
   the student stream), optionally together with the factors themselves;
4. after the last block an optional end-to-end pass minimises the KL divergence of the
   logits to the dense model's, and every corrector is folded into its factors
   (``U <- [U | B]``, ``V <- [V ; A]``), so the saved checkpoint is a plain factored one
   (or, with ``save="separate"``, kept apart for further training).

Corrector parameters are reserved before rank allocation, so they always count in the
budget. The math lives in :mod:`factorlm.compressor.correctors`; this module only
orchestrates it over blocks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.arch import get_arch
from ..runtime.checkpoint import fold_correctors
from ..runtime.factored_linear import FactoredLinear
from ..runtime.format import FactorlmError
from .correctors import (CorrectedLinear, attach_corrector, corrector_ranks, corrector_room, distill, eora_corrector, functional_residual,
                         gram_eigh, residual_energy, train_layer)
from .hooks import BlockContext
from .loss_plots import loss_curve_png
from .streaming import probe_groups
from .whitening import accumulate_gram

logger = logging.getLogger(__name__)

LOSS_PNG = "factorlm_corrector_loss.png"
MAX_LAYER_ROWS = 16384  # activation rows kept per layer for the per-layer stage


@dataclass
class CorrectorConfig:
    """How correctors are sized and trained.

    ``rank``: a fixed corrector rank for every factored layer, or ``None`` for ``auto``
    (ranks from the residual energy, spending ``fraction`` of the dense linear parameters).
    ``train``: ``"corrector"`` trains A and B only; ``"all"`` also fine-tunes the factors.
    ``save``: ``"folded"`` writes plain factors; ``"separate"`` keeps A and B apart in the
    checkpoint for further training (the runtime folds them on load).
    ``init``: the closed form starts from the ``"functional"`` residual (the layer's output
    error on the compressed stream against the dense layer on the dense stream, the default)
    or the ``"weight"`` residual W - UV (plain EoRA; the same thing when the factors were not
    fitted to compensate upstream error).
    Steps of 0 skip a stage; with all steps 0 the correctors are the closed form alone.
    """

    rank: int | None = None
    fraction: float = 0.03
    layer_steps: int = 50
    block_steps: int = 100
    distill_steps: int = 0
    lr: float = 1e-3
    distill_lr: float = 5e-5
    train: str = "all"
    save: str = "folded"
    multiple: int = 8
    max_rank: int = 128
    seed: int = 0
    init: str = "functional"

    def __post_init__(self) -> None:
        if self.init not in ("functional", "weight"):
            raise FactorlmError(f"corrector init must be 'functional' or 'weight', got {self.init!r}")
        if self.rank is not None and self.rank < 1:
            raise FactorlmError(f"corrector rank must be positive, got {self.rank}")
        if not 0.0 < self.fraction < 0.5:
            raise FactorlmError(f"corrector fraction must be in (0, 0.5), got {self.fraction}")
        if self.train not in ("corrector", "all"):
            raise FactorlmError(f"corrector train must be 'corrector' or 'all', got {self.train!r}")
        if self.save not in ("folded", "separate"):
            raise FactorlmError(f"corrector save must be 'folded' or 'separate', got {self.save!r}")
        if min(self.layer_steps, self.block_steps, self.distill_steps) < 0:
            raise FactorlmError("corrector step counts must be >= 0")


def block_output(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """Hidden states out of a decoder block, whether it returns a tensor or a tuple."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def capture_inputs(block: nn.Module, names: list[str], inputs: list[torch.Tensor], kwargs: dict[str, Any],
                   max_rows: int = MAX_LAYER_ROWS) -> dict[str, torch.Tensor]:
    """Input rows [N, in] of the named linears while ``block`` runs on ``inputs`` (evenly subsampled)."""
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [block.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: rows[n].append(args[0].detach().reshape(-1, args[0].shape[-1]).float()))
        for n in names]
    try:
        with torch.no_grad():
            for x in inputs:
                block_output(block, x, kwargs)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, chunks in rows.items():
        x = torch.cat(chunks)
        if x.shape[0] > max_rows:
            x = x[torch.linspace(0, x.shape[0] - 1, max_rows).long()]
        out[n] = x
    return out


def detach_tree(value: Any) -> Any:
    """``value`` with every tensor inside (tuples, lists, dicts) detached from any autograd graph."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(detach_tree(v) for v in value)
    if isinstance(value, dict):
        return {k: detach_tree(v) for k, v in value.items()}
    return value


def train_block(block: nn.Module, params: list[nn.Parameter], student: list[torch.Tensor],
                targets: list[torch.Tensor], kwargs: dict[str, Any], steps: int, lr: float,
                seed: int, check_every: int = 10) -> tuple[list[float], float]:
    """Minimise the relative MSE between ``block(student)`` and the dense block's ``targets``.

    Adam with a cosine-decayed learning rate, one calibration batch per step. Every
    ``check_every`` steps (and at the start) the error over all batches is measured and the
    best parameters seen are kept, so training never leaves the block worse than it found it.
    Returns the per-step losses and the best relative error (as :func:`relative_block_error`).
    """
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    student, targets, kwargs = detach_tree(student), detach_tree(targets), detach_tree(kwargs)
    scale = torch.stack([t.pow(2).mean() for t in targets]).mean().clamp_min(1e-12)
    gen = torch.Generator().manual_seed(seed)
    best_error = relative_block_error(block, student, targets, kwargs)
    best_state = [p.detach().clone() for p in params]
    losses = []
    with torch.enable_grad():
        for step in range(1, steps + 1):
            i = int(torch.randint(0, len(student), (1,), generator=gen))
            loss = F.mse_loss(block_output(block, student[i], kwargs), targets[i]) / scale
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if step % check_every == 0 or step == steps:
                error = relative_block_error(block, student, targets, kwargs)
                if error < best_error:
                    best_error, best_state = error, [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, best in zip(params, best_state):
            p.copy_(best)
    return losses, best_error


def relative_block_error(block: nn.Module, student: list[torch.Tensor], targets: list[torch.Tensor],
                         kwargs: dict[str, Any]) -> float:
    """||block(student) - targets|| / ||targets|| over all calibration batches."""
    num = den = 0.0
    with torch.no_grad():
        for x, t in zip(student, targets):
            num += float((block_output(block, x, kwargs) - t).double().pow(2).sum())
            den += float(t.double().pow(2).sum())
    return (num / max(den, 1e-30)) ** 0.5


@dataclass
class CorrectorHook:
    """A :class:`~factorlm.compressor.hooks.BlockHook` adding trained CALR correctors."""

    config: CorrectorConfig = field(default_factory=CorrectorConfig)
    history: list[dict[str, Any]] = field(default_factory=list)
    _reserved: int = 0
    _spent: int = 0
    _teacher_final: list[torch.Tensor] = field(default_factory=list)
    _eig_cache: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    _seconds: dict[str, float] = field(default_factory=lambda: {"init": 0.0, "layer": 0.0, "block": 0.0, "distill": 0.0})

    def reserved_params(self, shapes: dict[str, tuple[int, int]]) -> int:
        """Fixed rank: rank x (out + in) per layer; auto: ``fraction`` of the dense linear parameters."""
        if self.config.rank is not None:
            self._reserved = sum(self.config.rank * (o + i) for o, i in shapes.values())
        else:
            self._reserved = int(self.config.fraction * sum(o * i for o, i in shapes.values()))
        return self._reserved

    def _eig(self, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigen-decomposition of a Gram, computed once per block and matrix (q/k/v share one)."""
        key = id(gram)
        if key not in self._eig_cache:  # the cached gram stays referenced, so its id is not reused
            self._eig_cache[key] = (gram, gram_eigh(gram))
        return self._eig_cache[key][1]

    def _residuals(self, ctx: BlockContext, names: list[str], student_rows: dict[str, torch.Tensor],
                   teacher_rows: dict[str, torch.Tensor], dense: dict[str, nn.Linear]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per linear: the residual its corrector should remove, and the Gram that weights it."""
        residuals, grams = {}, {}
        shared: list[tuple[torch.Tensor, torch.Tensor]] = []  # (inputs, Gram): q/k/v and gate/up read one input
        for n in names:
            layer = ctx.block.get_submodule(n)
            if self.config.init == "functional":
                with torch.no_grad():
                    error = (dense[n](teacher_rows[n].to(dense[n].weight.dtype)).double()
                             - layer(student_rows[n].to(layer.weight_u.dtype)).double())
                x = student_rows[n]
                gram = next((g for rows, g in shared if rows.shape == x.shape and torch.equal(rows, x)), None)
                residuals[n], grams[n] = functional_residual(x, error, gram=gram)
                if gram is None:
                    shared.append((x, grams[n]))
            else:
                w = dense[n].weight.detach().double()
                residuals[n] = w - layer.weight_u.detach().double() @ layer.weight_v.detach().double()
                gram = ctx.grams.get(n)
                grams[n] = (gram if gram is not None else accumulate_gram(None, student_rows[n])).to(w.device)
        return residuals, grams

    def _ranks(self, ctx: BlockContext, residuals: dict[str, torch.Tensor], grams: dict[str, torch.Tensor],
               teacher_rows: dict[str, torch.Tensor], dense: dict[str, nn.Linear]) -> dict[str, int]:
        room = {n: corrector_room(*r.shape, ctx.block.get_submodule(n).rank) for n, r in residuals.items()}
        if self.config.rank is not None:
            return {n: min(self.config.rank, room[n]) for n in residuals}
        blocks_left = ctx.num_blocks - ctx.index
        budget = max(0, (self._reserved - self._spent) // max(blocks_left, 1))
        energies = {n: residual_energy(residuals[n], grams[n], self._eig(grams[n]))[:room[n]] for n in residuals}
        out_energy = {n: float((teacher_rows[n] @ dense[n].weight.detach().float().T).double().pow(2).sum())
                      for n in residuals}
        costs = {n: sum(residuals[n].shape) for n in residuals}
        return corrector_ranks(energies, out_energy, costs, budget, self.config.multiple, self.config.max_rank)

    def __call__(self, ctx: BlockContext) -> dict[str, dict[str, Any]]:
        cfg = self.config
        started = time.perf_counter()
        self._eig_cache.clear()
        names = [n for n in ctx.linear_names if isinstance(ctx.block.get_submodule(n), FactoredLinear)]
        student = [x.to(ctx.device) for x in ctx.student_inputs]
        teacher = [x.to(ctx.device) for x in ctx.teacher_inputs]
        with torch.no_grad():
            targets = [block_output(ctx.dense_block, x, ctx.block_kwargs) for x in teacher]
        if ctx.index == ctx.num_blocks - 1:
            self._teacher_final = [t.detach().cpu() for t in targets]
        if not names:
            return {}
        error_before = relative_block_error(ctx.block, student, targets, ctx.block_kwargs)
        student_rows = capture_inputs(ctx.block, names, student, ctx.block_kwargs)
        teacher_rows = capture_inputs(ctx.dense_block, names, teacher, ctx.block_kwargs)
        dense = {n: ctx.dense_block.get_submodule(n) for n in names}
        residuals, grams = self._residuals(ctx, names, student_rows, teacher_rows, dense)
        ranks = self._ranks(ctx, residuals, grams, teacher_rows, dense)
        report: dict[str, dict[str, Any]] = {n_full: {"corrector_rank": ranks.get(n, 0)}
                                             for n, n_full in ctx.linear_names.items() if n in names}
        corrected: dict[str, CorrectedLinear] = {}
        originals = {n: [p.detach().clone() for p in ctx.block.get_submodule(n).parameters()] for n in names}
        # functional init goes group by group in execution order (q/k/v, o, gate/up, down): a group's
        # residual is taken with the earlier groups' correctors in place, so no error is corrected twice
        groups = (probe_groups(ctx.block, names, student[0], ctx.block_kwargs, student[0].device)
                  if cfg.init == "functional" else [names])
        for gi, group in enumerate(groups):
            todo = [n for n in group if ranks.get(n, 0) > 0]
            if gi > 0 and todo and corrected:
                student_rows.update(capture_inputs(ctx.block, todo, student, ctx.block_kwargs))
                self._eig_cache.clear()
                update = self._residuals(ctx, todo, student_rows, teacher_rows, dense)
                residuals.update(update[0])
                grams.update(update[1])
            for n in todo:
                base = ctx.block.get_submodule(n)
                a, b = eora_corrector(residuals[n], grams[n], ranks[n], self._eig(grams[n]))
                dtype = base.weight_u.dtype
                module = attach_corrector(base, a.to(dtype), b.to(dtype), train_base=cfg.train == "all")
                parent, _, child = n.rpartition(".")
                setattr(ctx.block.get_submodule(parent) if parent else ctx.block, child, module)
                corrected[n] = module
                self._spent += ranks[n] * sum(residuals[n].shape)
        self._eig_cache.clear()
        self._seconds["init"] += time.perf_counter() - started
        error_init = relative_block_error(ctx.block, student, targets, ctx.block_kwargs)
        t0 = time.perf_counter()
        if cfg.layer_steps and corrected:
            snapshot = [p.detach().clone() for m in corrected.values() for p in m.parameters()]
            with torch.enable_grad():
                for n, module in corrected.items():
                    target = teacher_rows[n] @ dense[n].weight.detach().float().T
                    if dense[n].bias is not None:
                        target = target + dense[n].bias.detach().float()
                    losses = train_layer(module, student_rows[n].to(module.corrector_a.dtype), target.to(module.corrector_a.dtype),
                                         steps=cfg.layer_steps, lr=cfg.lr, seed=cfg.seed + ctx.index)
                    report[ctx.linear_names[n]]["layer_loss"] = [round(losses[0], 6), round(losses[-1], 6)]
            if relative_block_error(ctx.block, student, targets, ctx.block_kwargs) > error_init:
                # each layer fits its own output, not the block's: keep that only when the block gains
                with torch.no_grad():
                    for p, kept in zip((p for m in corrected.values() for p in m.parameters()), snapshot):
                        p.copy_(kept)
                logger.info("block %d: per-layer training raised the block error; kept the closed form", ctx.index)
        self._seconds["layer"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        if cfg.block_steps and corrected:
            params = [p for m in corrected.values() for p in m.parameters() if p.requires_grad]
            frozen = [p for p in ctx.block.parameters() if all(p is not q for q in params)]
            saved = [p.requires_grad for p in frozen]
            for p in frozen:
                p.requires_grad_(False)
            try:
                losses, _ = train_block(ctx.block, params, student, targets, ctx.block_kwargs,
                                        cfg.block_steps, cfg.lr, cfg.seed + ctx.index)
            finally:
                for p, s in zip(frozen, saved):
                    p.requires_grad_(s)
            self.history.extend({"stage": "block", "block": ctx.index, "step": i, "loss": v} for i, v in enumerate(losses))
        self._seconds["block"] += time.perf_counter() - t0
        for m in corrected.values():
            for p in m.parameters():
                p.requires_grad_(False)
        error_after = relative_block_error(ctx.block, student, targets, ctx.block_kwargs)
        fallback = corrected and error_after > error_before
        if fallback:
            # neither the closed form nor training beat the plain factorization on this block's
            # output: restore the factors and silence the correctors (their parameters stay
            # counted, so the budget is honest)
            with torch.no_grad():
                for n, module in corrected.items():
                    for p, original in zip(module.factor_parameters(), originals[n]):
                        p.copy_(original)
                    module.corrector_b.zero_()
            error_after = relative_block_error(ctx.block, student, targets, ctx.block_kwargs)
        logger.info("block %d: output error %.4f -> %.4f (closed form) -> %.4f (trained)",
                    ctx.index, error_before, error_init, error_after)
        for n in names:
            report[ctx.linear_names[n]].update(block_error_before=round(error_before, 6),
                                               block_error_closed_form=round(error_init, 6),
                                               block_error_after=round(error_after, 6),
                                               corrector_fallback=bool(fallback))
        return report

    def extra_files(self) -> dict[str, bytes]:
        """The loss curve, saved in the checkpoint folder as ``factorlm_corrector_loss.png``."""
        png = loss_curve_png(self.history)
        return {LOSS_PNG: png} if png else {}

    def finalize(self, model: nn.Module, calib_ids: torch.Tensor) -> dict[str, Any]:
        """Optional end-to-end KL distillation, then fold every corrector into its factors (unless saved separate)."""
        cfg = self.config
        layers = [m for m in model.modules() if isinstance(m, CorrectedLinear)]
        distill_losses: list[float] = []
        if cfg.distill_steps and layers and self._teacher_final:
            t0 = time.perf_counter()
            distill_losses = self._distill(model, calib_ids, layers)
            self._seconds["distill"] += time.perf_counter() - t0
        if cfg.save == "folded":
            fold_correctors(model)
        return {
            "corrector_params": self._spent,
            "corrector_params_reserved": self._reserved,
            "corrected_modules": len(layers),
            "corrector_save": cfg.save,
            "distill_loss": [round(distill_losses[0], 6), round(distill_losses[-1], 6)] if distill_losses else None,
            "seconds": {k: round(v, 2) for k, v in self._seconds.items()},
            "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        }

    def _distill(self, model: nn.Module, calib_ids: torch.Tensor, layers: list[CorrectedLinear]) -> list[float]:
        """KL(dense || compressed) on the logits; the dense logits come from the teacher stream's last hidden states."""
        cfg = self.config
        norm = model.get_submodule(get_arch(model.config).final_norm_path)
        head = model.get_output_embeddings()
        device = next(model.parameters()).device
        batches = [calib_ids[i:i + 1].to(device) for i in range(calib_ids.shape[0])]
        hidden = [h for t in self._teacher_final for h in t.split(1)]
        with torch.no_grad():
            teacher = [head(norm(h.to(device))).float().log_softmax(-1) for h in hidden[:len(batches)]]
        params: list[nn.Parameter] = []
        for m in layers:
            for p in [m.corrector_a, m.corrector_b] + (m.factor_parameters() if cfg.train == "all" else []):
                p.requires_grad_(True)
                params.append(p)

        def on_step(step: int, loss: float) -> None:
            self.history.append({"stage": "distill", "block": -1, "step": step, "loss": loss})

        try:
            with torch.enable_grad():
                return distill(model, batches, teacher, params, cfg.distill_steps, lr=cfg.distill_lr, on_step=on_step)
        finally:
            for p in params:
                p.requires_grad_(False)
