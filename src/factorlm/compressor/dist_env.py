"""torch.distributed set-up for data-parallel healing under ``torchrun --nproc-per-node N``.

``torchrun`` sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``; without them everything runs in one
process. The backend is gloo on the CPU and nccl on CUDA. Models that do not fit one device
would need FSDP (``torch.distributed.fsdp.fully_shard``) instead of DDP; that is not wired in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job: rank, world size and its compute device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "cpu") -> DistEnv:
    """Join the process group torchrun described in the environment (or stay single-process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if world <= 1:
        return DistEnv(0, 1, dev)
    rank = int(os.environ["RANK"])
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistEnv(rank, world, dev)


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
