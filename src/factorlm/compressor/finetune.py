"""End-to-end distillation of a factored checkpoint against its dense model.

Block-wise compression fits each block to the dense block's output, one at a time; errors
still add up over the depth of the network. This pass trains the whole compressed model at
once on KL(dense ‖ compressed) of the next-token distributions over calibration text: every
factor U, V (and every corrector A, B kept separate) moves, embeddings and norms stay fixed,
so the parameter count, the ranks and the checkpoint format do not change. On a quantized
checkpoint only the scales move (``train="scales"``): the integer codes stay as stored.

The teacher's log-probabilities are computed on the fly (one extra forward per step, no
[tokens, vocab] store) or once, as a top-k cache (teacher_cache.py); the loop with batches,
gradient accumulation, DDP/FSDP and resumable checkpoints is in heal_loop.py. Training windows
come from the first 90% of the text's tokens and the held-out windows that measure the gain
from the last 10%, so the reported held-out KL is on text the steps never saw.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..runtime.factored_linear import CorrectedLinear, FactoredLinear
from ..runtime.format import FactorlmError
from .correctors import kl_to_teacher
from .dist_env import PARALLEL_MODES, DistEnv, barrier, full_state_dict, init_distributed, shard_model
from .heal_loop import forward_autocast, train as train_loop
from .teacher_cache import load_or_build
from .loss_plots import loss_png

logger = logging.getLogger(__name__)

HELD_OUT_FRACTION = 0.1
TRAIN_CHOICES = ("all", "correctors", "scales")
# peak learning rates: absolute for factors and correctors, relative to each tensor's mean for scales
DEFAULT_LR = {"all": 3e-5, "correctors": 3e-5, "scales": 3e-3}


@dataclass
class FinetuneConfig:
    """Steps, optimiser, batching and data of the distillation pass.

    ``train``: ``"all"`` trains every factor and corrector, ``"correctors"`` only the
    correctors (A, B) of a checkpoint saved with ``--corrector-save separate``, ``"scales"``
    only the scales of a quantized checkpoint (the teacher is then best the floating-point
    checkpoint it was quantized from, so that the loss is the quantization error alone).
    ``lr`` of ``None`` is :data:`DEFAULT_LR` for ``train``; for scales it is relative (see
    :func:`relative_lr`). ``warmup`` of ``None`` means 10% of the steps. ``samples`` of ``None`` draws a fresh window for
    every window the run reads (steps x global batch), so no window is seen twice: on the sample
    model, 120 steps over 120 distinct windows reached a lower held-out KL and WikiText-2
    perplexity than 120 steps cycling over 64 (same time). A step reads ``batch_size`` windows per
    micro-batch, ``grad_accum`` micro-batches per process. ``top_k`` of ``None`` runs the teacher
    on the fly; an integer caches its top-k log-probabilities once (in ``cache_dir`` if given).
    ``save_every`` > 0 writes a resumable training state every that many steps. ``parallel``
    (``ddp`` or ``fsdp``) is how a torchrun job with several processes splits the work
    (dist_env.py); one process ignores it. ``bf16`` runs the student's and the teacher's forwards
    under CPU bf16 autocast (on CUDA the student always is): the weights, Adam and the loss stay
    fp32, so only the matmuls round; see docs/healing.md for the measured speed and loss change.
    The held-out KL is always computed in fp32.
    """

    steps: int = 100
    lr: float | None = None
    warmup: int | None = None
    samples: int | None = None
    seq_len: int = 512
    held_out: int = 4
    clip: float = 1.0
    train: str = "all"
    seed: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    top_k: int | None = None
    cache_dir: str | None = None
    save_every: int = 0
    device: str = "cpu"
    parallel: str = "ddp"
    bf16: bool = False

    def __post_init__(self) -> None:
        if self.train not in TRAIN_CHOICES:
            raise FactorlmError(f"finetune train must be one of {TRAIN_CHOICES}, got {self.train!r}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.train]
        if self.steps < 1 or (self.samples is not None and self.samples < 1) or self.held_out < 1 or self.seq_len < 2:
            raise FactorlmError("finetune needs steps, samples and held-out windows >= 1 and seq_len >= 2")
        if self.batch_size < 1 or self.grad_accum < 1 or (self.top_k is not None and self.top_k < 1):
            raise FactorlmError("finetune needs batch_size, grad_accum and top_k >= 1")
        if self.lr <= 0:
            raise FactorlmError(f"finetune learning rate must be positive, got {self.lr}")
        if self.parallel not in PARALLEL_MODES:
            raise FactorlmError(f"finetune parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}")

    @property
    def warmup_steps(self) -> int:
        return max(1, self.steps // 10) if self.warmup is None else self.warmup

    def windows_needed(self, world_size: int) -> int:
        """Training windows: ``samples``, or one fresh window per window read by the whole run."""
        return self.samples or self.steps * self.batch_size * self.grad_accum * world_size


def trainable_factors(model: nn.Module, train: str) -> list[nn.Parameter]:
    """The parameters the pass trains: factors and correctors (``all``), correctors only, or the
    scales of a quantized checkpoint's layers (``scales``: the codes stay, every weight is still
    ``code * scale``, so the output has the same format and size).

    A quantized LM head keeps its scales: they set the output distribution directly and learn the
    training text's word frequencies (on the sample model, 96 steps x 1,024 tokens with them trained
    too left WikiText-2 perplexity where it was, 150.1 -> 149.0, against 130.7 with the head fixed;
    quant.md).
    """
    from ..runtime.quant_linear import quantized_modules

    quantized = quantized_modules(model)
    if train == "scales":
        if not quantized:
            raise FactorlmError("nothing to train: --train scales needs a quantized checkpoint (factorlm quantize)")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return [p for layer in quantized.values() if layer is not head for p in layer.trainable_scales()]
    if quantized and train == "all":
        raise FactorlmError("a quantized checkpoint's factors are integer codes; train their scales (--train scales) "
                            "or finetune the floating-point checkpoint before quantizing it")
    params: list[nn.Parameter] = []
    for module in model.modules():
        if not isinstance(module, FactoredLinear):
            continue
        if train == "all":
            params += [module.weight_u, module.weight_v]
        if isinstance(module, CorrectedLinear):
            params += [module.corrector_a, module.corrector_b]
    if not params:
        what = "factored layers" if train == "all" else "separate correctors (compress with --corrector-save separate)"
        raise FactorlmError(f"nothing to train: the model has no {what}")
    return params


def relative_lr(named: dict[str, nn.Parameter], train: str) -> dict[str, float] | None:
    """Per-tensor learning-rate multipliers: with ``train="scales"`` each tensor's mean magnitude,
    so the learning rate is a relative step (the scales of one model span orders of magnitude:
    V's are far smaller than U's); ``None`` (one rate for all) otherwise."""
    if train != "scales":
        return None
    return {n: float(p.detach().abs().mean()) or 1.0 for n, p in named.items()}


def split_windows(ids: torch.Tensor, cfg: FinetuneConfig, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(training windows from the first 90% of ``ids``, held-out windows from the last 10%)."""
    from .calib_sources import token_windows

    cut = int(ids.numel() * (1 - HELD_OUT_FRACTION))
    train = token_windows(ids[:cut], cfg.samples or cfg.steps, cfg.seq_len, cfg.seed, where=f"{where} (training part)")
    held = token_windows(ids[cut:], cfg.held_out, cfg.seq_len, cfg.seed + 1, where=f"{where} (held-out last 10%)")
    return train, held


@torch.no_grad()
def mean_kl(student: nn.Module, teacher: nn.Module, windows: torch.Tensor) -> float:
    """Mean per-token KL(teacher ‖ student) over ``windows``, one window at a time."""
    total = 0.0
    for row in windows.split(1):
        total += float(kl_to_teacher(student(input_ids=row).logits, teacher(input_ids=row).logits.float().log_softmax(-1)))
    return total / windows.shape[0]


def set_trainable(model: nn.Module, train: str) -> list[nn.Parameter]:
    """Freeze every parameter of ``model`` but the trained ones (:func:`trainable_factors`); returns those."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = trainable_factors(model, train)
    for p in params:
        p.requires_grad_(True)
    return params


def finetune(student: nn.Module, teacher: nn.Module, train: torch.Tensor, held_out: torch.Tensor,
             cfg: FinetuneConfig, progress: bool = True, *, env: DistEnv | None = None,
             state_dir: Path | None = None, resume: bool = False, stop_after: int | None = None,
             teacher_id: str = "teacher", after_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Distil ``student`` towards ``teacher`` in place; returns losses, held-out KL and timings.

    ``after_step(done)`` runs after each optimiser step (``done`` steps so far), e.g. to snapshot.
    """
    env = env or DistEnv(device=torch.device(cfg.device))
    params = set_trainable(student, cfg.train)
    ids = {id(p) for p in params}
    named = {n: p for n, p in student.named_parameters() if id(p) in ids}
    student.eval()  # no dropout either way; eval keeps HF's inference code paths
    teacher.eval()

    t0 = time.perf_counter()
    before = mean_kl(student, teacher, held_out.to(env.device))
    t1 = time.perf_counter()

    def teacher_ac() -> Any:  # the teacher rounds to bf16 only when asked, on either device
        return forward_autocast(env.device, True) if cfg.bf16 else contextlib.nullcontext()

    if cfg.top_k is not None:
        with teacher_ac():
            cache = load_or_build(teacher, train.to(env.device), cfg.top_k, Path(cfg.cache_dir) if cfg.cache_dir else None,
                                  teacher_id + ("|bf16" if cfg.bf16 else ""), env)

        def target(rows: list[int]) -> tuple:
            return ("topk", cache[0][rows].to(env.device), cache[1][rows].to(env.device))
    else:
        def target(rows: list[int]) -> tuple:
            with torch.no_grad(), teacher_ac():
                return ("full", teacher(input_ids=train[rows].to(env.device)).logits.float().log_softmax(-1))
    t_cache = time.perf_counter()
    bar = tqdm(total=cfg.steps, desc="finetune (KL to dense)", unit="step", disable=not progress or not env.is_main)

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(kl=f"{loss:.4f}")
        if after_step is not None:
            after_step(step + 1)

    try:
        with torch.enable_grad():
            losses = train_loop(student, named, train, target, cfg, env, state_dir=state_dir, resume=resume,
                                stop_after=stop_after, on_step=on_step, lr_scale=relative_lr(named, cfg.train))
    finally:
        bar.close()
        for p in params:
            p.requires_grad_(False)
    t2 = time.perf_counter()
    after = mean_kl(student, teacher, held_out.to(env.device))
    global_batch = cfg.batch_size * cfg.grad_accum * env.world_size
    tokens = len(losses) * global_batch * int(train.shape[1])
    logger.info("held-out KL %.4f -> %.4f after %d steps (%.0f s)", before, after, len(losses), t2 - t1)
    return {
        "config": {**asdict(cfg), "samples": int(train.shape[0])},
        "world_size": env.world_size,
        "parallel": env.mode,
        "global_batch": global_batch,
        "trained_params": sum(p.numel() for p in params),
        "train_tokens_per_step": global_batch * int(train.shape[1]),
        "train_tokens": tokens,
        "held_out_kl_before": round(before, 6),
        "held_out_kl_after": round(after, 6),
        "loss": [round(v, 6) for v in losses],
        "seconds": {"teacher_cache": round(t_cache - t1, 2), "train": round(t2 - t_cache, 2),
                    "held_out_eval": round(time.perf_counter() - t2 + t1 - t0, 2)},
        "tokens_per_s": round(tokens / max(t2 - t1, 1e-9), 1),
    }


def state_dir_for(out_dir: str | Path) -> Path:
    """Where periodic training states of a run writing ``out_dir`` go: ``<out_dir>.train-state``."""
    out = Path(out_dir)
    return out.with_name(out.name + ".train-state")


def snapshots_dir_for(out_dir: str | Path) -> Path:
    """Where ``snapshot_steps`` checkpoints of a run writing ``out_dir`` go: ``<out_dir>.snapshots/step-N``."""
    out = Path(out_dir)
    return out.with_name(out.name + ".snapshots")


def finetune_checkpoint(student_dir: str | Path, teacher_dir: str | Path, out_dir: str | Path, source: str,
                        cfg: FinetuneConfig, *, overwrite: bool = False, progress: bool = True,
                        resume: bool = False, stop_after: int | None = None,
                        snapshot_steps: Sequence[int] = ()) -> tuple[Path, dict]:
    """Load a factored checkpoint and its dense model, distil, save to ``out_dir`` atomically.

    Under torchrun every rank trains its share of each global batch; only rank 0 writes. With
    ``cfg.parallel == "fsdp"`` both models are sharded over the ranks (dist_env.shard_model) and the
    output is written from the gathered full state dict.
    ``snapshot_steps``: after each of these steps rank 0 also writes the model so far as a factored
    checkpoint ``<out_dir>.snapshots/step-N`` (a healing curve evaluates them afterwards; the
    learning-rate schedule is the full run's, so a snapshot is not a shorter run's result).
    """
    import json

    from ..runtime.checkpoint import load_factored, load_model, load_tokenizer, save_factored
    from ..runtime.format import FactoredConfig, read_factored_config
    from .calib_sources import source_ids

    src, out = Path(student_dir), Path(out_dir)
    if out.exists() and not overwrite:
        raise FactorlmError(f"{out}: output directory exists; pass --overwrite to replace it")
    state = state_dir_for(out)
    if resume and not state.exists():
        raise FactorlmError(f"{state}: no training state to resume (run with --save-every first)")
    block = read_factored_config(src)
    if block is None:
        raise FactorlmError(f"{src / 'config.json'}: not a factorlm checkpoint (no factorlm quantization_config)")
    env = init_distributed(cfg.device, cfg.parallel)
    student = load_factored(src, fast_layout=False, correctors="keep")
    teacher = load_model(teacher_dir, fast_layout=False)
    if env.sharded:  # the shards move to the device; set the trained flags first (FSDP2 reads them)
        set_trainable(student, cfg.train)
        teacher.requires_grad_(False)
        shard_model(student, env)
        shard_model(teacher, env)
    else:
        student, teacher = student.to(env.device), teacher.to(env.device)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise FactorlmError(f"{teacher_dir}: vocabulary size {teacher.config.vocab_size} differs from the "
                            f"checkpoint's {student.config.vocab_size}; the teacher must be the model it was compressed from")
    tokenizer = load_tokenizer(src)
    config = FactoredConfig(ranks={}, dense=block.dense, producer=block.producer, rounding=block.rounding,
                            bits=block.bits, group_size=block.group_size)
    wanted = {int(n) for n in snapshot_steps}
    if any(n < 1 or n > cfg.steps for n in wanted):
        raise FactorlmError(f"snapshot steps must lie in 1..{cfg.steps} (the run's steps), got {sorted(wanted)}")

    def snapshot(done: int) -> None:
        if done in wanted and env.is_main:
            where = snapshots_dir_for(out) / f"step-{done}"
            save_factored(student, where, tokenizer=tokenizer, config=config, overwrite=True,
                          extra_files={"factorlm_snapshot.json": json.dumps({"step": done, "of_steps": cfg.steps})})
            logger.info("snapshot after step %d -> %s", done, where)

    train, held = split_windows(source_ids(tokenizer, source),
                                replace(cfg, samples=cfg.windows_needed(env.world_size)), where=str(source))
    report = finetune(student, teacher, train, held, cfg, progress=progress, env=env,
                      state_dir=state if (cfg.save_every or resume) else None, resume=resume,
                      stop_after=stop_after, teacher_id=str(Path(teacher_dir).resolve()), after_step=snapshot)
    report["source"] = str(source)
    del teacher
    if stop_after is not None and len(report["loss"]) < cfg.steps:
        return state, report  # stopped early on purpose: the training state is the output
    if env.sharded:  # every rank takes part in the gather; rank 0 rebuilds a whole model to save
        full = full_state_dict(student, env)
        del student
        if env.is_main:
            student = load_factored(src, fast_layout=False, correctors="keep")
            student.load_state_dict(full)  # copies (assign would untie tied embeddings)
        del full
    if env.is_main:
        extra: dict[str, str | bytes] = {name: (src / name).read_bytes() for name in
                                         ("factorlm_recipe.yaml", "factorlm_report.json", "factorlm_corrector_loss.png",
                                          "factorlm_quantization.json")
                                         if (src / name).is_file()}
        extra["factorlm_finetune.json"] = json.dumps(report, indent=2)
        extra["factorlm_finetune_loss.png"] = loss_png(report)
        save_factored(student.cpu(), out, tokenizer=tokenizer, extra_files=extra, overwrite=overwrite,
                      config=config)
        shutil.rmtree(state, ignore_errors=True)
    barrier(env)
    return out, report
