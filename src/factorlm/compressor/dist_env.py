"""torch.distributed set-up for healing under ``torchrun --nproc-per-node N``: DDP or FSDP2.

``torchrun`` sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``; without them everything runs in one
process. The backend is gloo on the CPU and nccl on CUDA. Two parallel modes:

- ``ddp``: every rank holds the whole student and teacher; DDP averages the gradients.
- ``fsdp``: ``torch.distributed.fsdp.fully_shard`` (FSDP2) shards the parameters of every decoder
  block, then the root (embeddings, head, final norm), over the ranks, for the student and the
  teacher, so each device holds 1/N of the weights plus one block gathered at a time. The
  models load on the host and each shard moves to its device. Gradients are reduce-scattered
  (averaged) after every micro-batch; the optimiser states are sharded like their parameters.
  Checkpoints gather the full tensors (:func:`full_tensor`) so a training state or an output
  does not depend on the number of ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..runtime.format import FactorlmError

PARALLEL_MODES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job: rank, world size, compute device and parallel mode."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    parallel: str = "ddp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """True when the models are FSDP-sharded over more than one rank."""
        return self.active and self.parallel == "fsdp"

    @property
    def mode(self) -> str:
        """What the run did, as recorded in reports: ``single``, ``ddp`` or ``fsdp``."""
        return self.parallel if self.active else "single"


def init_distributed(device: str = "cpu", parallel: str = "ddp") -> DistEnv:
    """Join the process group torchrun described in the environment (or stay single-process)."""
    if parallel not in PARALLEL_MODES:
        raise FactorlmError(f"parallel mode must be one of {PARALLEL_MODES}, got {parallel!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if world <= 1:
        return DistEnv(0, 1, dev, parallel)
    rank = int(os.environ["RANK"])
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistEnv(rank, world, dev, parallel)


def shard_model(model: nn.Module, env: DistEnv) -> nn.Module:
    """``fully_shard`` every decoder block, then the root, over all ranks (in place; returns it).

    Set ``requires_grad`` before calling: FSDP2 builds its gathered parameters from the flags.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..runtime.arch import decoder_layers

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    for block in decoder_layers(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (a collective: every rank must call it), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``ref``: this rank's shard when ``ref`` is a DTensor, else on its device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(ref, DTensor):
        return distribute_tensor(full.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)
    return full.to(ref.device)


def full_state_dict(model: nn.Module, env: DistEnv) -> dict[str, torch.Tensor]:
    """The model's whole state dict on the CPU of rank 0 (empty on the others), one tensor gathered at a time.

    A collective under FSDP: every rank must call it.
    """
    out: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        full = full_tensor(value.detach())
        if env.is_main:
            out[name] = full.cpu()
        del full
    return out


def mean_across(value: float, env: DistEnv) -> float:
    """The mean of a per-rank scalar over the job (the value itself in one process)."""
    if not env.active:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / env.world_size


def barrier(env: DistEnv) -> None:
    if env.active:
        dist.barrier()
