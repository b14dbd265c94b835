"""torchrun process setup (DDP on NCCL for GPUs, gloo for CPU) and cross-rank helpers."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    """Where this process stands: rank, world size, device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str = "auto") -> Dist:
    """Join the torchrun process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu" if device_name == "auto" else device_name)
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world_size, local_rank, device)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """A full (unsharded, unwrapped) state dict on the CPU, from a plain, DDP or FSDP module."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        module = module.module
    try:
        from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType
        if isinstance(module, FullyShardedDataParallel):
            with FullyShardedDataParallel.state_dict_type(module, StateDictType.FULL_STATE_DICT,
                                                          FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
                return module.state_dict()
    except ImportError:
        pass
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value
