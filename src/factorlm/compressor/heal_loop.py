"""The distillation training loop: batches, gradient accumulation, DDP/FSDP, autocast, checkpoints.

A step consumes a global batch of ``batch_size x grad_accum x world_size`` windows, taken in
order from the window list (step ``s`` reads windows ``[s*G, (s+1)*G)`` modulo their number), so
the data position is the step number alone and a resumed run reads exactly what the killed one
would have. Rank ``r`` takes micro-batch ``a*W + r`` of the step; DDP averages the gradients, so
the update equals one process on the same global batch; under FSDP the models arrive sharded
(dist_env.shard_model) and the gradients are reduce-scattered after each micro-batch, the same
average. The training state (trained parameters, Adam moments, RNG, step, losses) is saved
in safetensors + JSON, never pickle.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..runtime.format import FactorlmError
from .correctors import kl_to_teacher, lr_factor
from .dist_env import DistEnv, barrier, full_tensor, mean_across, shard_like
from .teacher_cache import topk_kl


def forward_autocast(device: torch.device, bf16: bool) -> Any:
    """The autocast context of the training forwards: bf16 on CUDA always, on the CPU when asked."""
    if device.type == "cuda" or bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

logger = logging.getLogger(__name__)

STATE_JSON, STATE_TENSORS = "trainer_state.json", "trainer_state.safetensors"


def step_windows(step: int, n: int, global_batch: int) -> list[int]:
    """Indices of the windows the global batch of ``step`` reads (cycling over ``n``)."""
    return [(step * global_batch + j) % n for j in range(global_batch)]


def state_tensors(named: dict[str, nn.Parameter], opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Trained parameters, Adam moments and RNG as full CPU tensors (gathered from FSDP shards).

    Under FSDP this is a collective: every rank must call it.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, p in named.items():
        tensors[f"param/{name}"] = full_tensor(p.detach()).cpu().contiguous()
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in st:
                value = full_tensor(torch.as_tensor(st[key]).detach()).cpu()
                tensors[f"adam/{key}/{name}"] = value.reshape(-1 if key == "step" else value.shape).contiguous()
    tensors["rng/torch"] = torch.get_rng_state()
    return tensors


def save_state(path: Path, tensors: dict[str, torch.Tensor], step: int, meta: dict[str, Any]) -> None:
    """Write the training state to ``path`` atomically (a temporary folder renamed into place)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / STATE_TENSORS))
    (tmp / STATE_JSON).write_text(json.dumps({**meta, "step": step}, indent=2))
    old = path.with_name(path.name + ".old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def load_state(path: Path, named: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
               meta: dict[str, Any]) -> dict[str, Any]:
    """Restore a state written by :func:`save_state`; refuses one from a different run setup.

    Every rank reads the full tensors and keeps its shard of them under FSDP.
    """
    if not (path / STATE_JSON).is_file() or not (path / STATE_TENSORS).is_file():
        raise FactorlmError(f"{path}: no training checkpoint to resume ({STATE_JSON} + {STATE_TENSORS})")
    saved = json.loads((path / STATE_JSON).read_text())
    for key, value in meta["config"].items():
        if saved["config"].get(key) != value:
            raise FactorlmError(f"{path / STATE_JSON}: config field {key!r} is {saved['config'].get(key)!r}, "
                                f"this run has {value!r}; resume needs the same settings")
    t = load_file(str(path / STATE_TENSORS))
    with torch.no_grad():
        for name, p in named.items():
            if f"param/{name}" not in t:
                raise FactorlmError(f"{path / STATE_TENSORS}: missing parameter {name!r}")
            p.copy_(shard_like(t[f"param/{name}"], p))
            if f"adam/exp_avg/{name}" in t:
                opt.state[p] = {"step": t[f"adam/step/{name}"].reshape(()).clone(),
                                "exp_avg": shard_like(t[f"adam/exp_avg/{name}"], p).clone(),
                                "exp_avg_sq": shard_like(t[f"adam/exp_avg_sq/{name}"], p).clone()}
    torch.set_rng_state(t["rng/torch"])
    return saved


def train(student: nn.Module, named: dict[str, nn.Parameter], windows: torch.Tensor,
          teacher_target: Callable[[list[int]], tuple], cfg: Any, env: DistEnv, *,
          state_dir: Path | None = None, resume: bool = False, stop_after: int | None = None,
          on_step: Callable[[int, float], None] | None = None,
          lr_scale: dict[str, float] | None = None) -> list[float]:
    """Run ``cfg.steps`` optimiser steps; returns the per-step loss (mean over the global batch).

    ``lr_scale`` multiplies the learning rate of the named parameters (1 for the others): Adam
    moves every element by about the learning rate, so a tensor whose values are ~1e-3 needs a
    step that size, e.g. the scales of quantized weights, trained relative to their magnitude.

    ``teacher_target(indices)`` gives the teacher side for those windows: ``("full", logp)`` or
    ``("topk", logp, idx)``. ``stop_after`` ends the run early (as a kill would) after that step.
    """
    params = list(named.values())
    model: nn.Module = student
    if env.active and not env.sharded:  # FSDP shards the models in place before training
        model = nn.parallel.DistributedDataParallel(student, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    groups: dict[float, list[nn.Parameter]] = {}  # one group per multiplier: Adam's foreach path per group
    for n, p in named.items():
        groups.setdefault((lr_scale or {}).get(n, 1.0), []).append(p)
    opt = torch.optim.Adam([{"params": ps, "lr_scale": m} for m, ps in groups.items()], lr=cfg.lr)
    meta = {"config": {k: getattr(cfg, k) for k in ("steps", "lr", "warmup_steps", "batch_size", "grad_accum",
                                                    "seq_len", "samples", "seed", "top_k", "train", "clip", "bf16")},
            "world_size": env.world_size, "parallel": env.mode}
    losses: list[float] = []
    start = 0
    if resume and state_dir is not None and state_dir.exists():
        saved = load_state(state_dir, named, opt, meta)
        start, losses = int(saved["step"]), list(saved["losses"])
        logger.info("resumed from %s at step %d", state_dir, start)
    b, accum, w = cfg.batch_size, cfg.grad_accum, env.world_size
    for step in range(start, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * group["lr_scale"] * lr_factor(step, cfg.steps, cfg.warmup_steps)
        idx = step_windows(step, windows.shape[0], b * accum * w)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for a in range(accum):
            mine = idx[(a * w + env.rank) * b:(a * w + env.rank + 1) * b]
            last = not env.active or env.sharded or a == accum - 1  # FSDP reduce-scatters every micro-batch
            sync = contextlib.nullcontext() if last else model.no_sync()
            with sync:
                with forward_autocast(env.device, cfg.bf16):
                    logits = model(input_ids=windows[mine].to(env.device)).logits
                target = teacher_target(mine)
                loss = kl_to_teacher(logits, target[1]) if target[0] == "full" else topk_kl(logits, *target[1:])
                (loss / accum).backward()
            total += float(loss.detach()) / accum
        if cfg.clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        losses.append(mean_across(total, env))
        if on_step:
            on_step(step, losses[-1])
        done = step + 1
        if state_dir is not None and cfg.save_every and (done % cfg.save_every == 0 or done == stop_after):
            tensors = state_tensors(named, opt)  # every rank: FSDP gathers the shards
            if env.is_main:
                save_state(state_dir, tensors, done, {**meta, "losses": losses})
            del tensors
            barrier(env)
        if stop_after is not None and done >= stop_after:
            break
    return losses
