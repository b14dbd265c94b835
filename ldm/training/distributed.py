"""torchrun process setup (DDP on NCCL for GPUs, gloo for CPU) and cross-rank helpers."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Mapping

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
        # torchrun's store outlives a restart (--max-restarts): the workers of round n key their process group
        # under round n, or a restarted rank would read the address a dead one published and fail to connect.
        store, rank, world_size = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"ldm/round{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=store, rank=rank, world_size=world_size)
    return Dist(rank, world_size, local_rank, device)


def ensure_process_group(world: Dist) -> None:
    """A process group even for one process (FSDP2 shards over a device mesh, which needs one): a 1-rank group
    on an in-memory store, so a plain `python` run needs no torchrun variables."""
    if not dist.is_initialized():
        if world.world_size != 1:
            raise RuntimeError("several ranks but no process group: launch with torchrun")
        dist.init_process_group(backend="nccl" if world.device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def full_tensors(tensors: Mapping[str, torch.Tensor], *, keep: bool) -> dict[str, torch.Tensor]:
    """Whole (unsharded) copies of `tensors`, detached, on their device, never sharing memory with them: FSDP2's
    DTensor shards are gathered one at a time (a collective: every rank calls this, in the same order), and
    only where `keep` is a copy returned, so the full model is never held on every rank at once. {} where not
    `keep`."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, value in tensors.items():
        local = value.detach().to_local() if isinstance(value, DTensor) else value.detach()
        full = value.detach().full_tensor() if isinstance(value, DTensor) else local
        if keep:  # one rank's "gather" may hand back its own shard: copied, so nobody writes into the original
            same = full.numel() and full.untyped_storage().data_ptr() == local.untyped_storage().data_ptr()
            out[name] = full.clone() if same else full
    return out


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """A full (unsharded, unwrapped) state dict on the CPU, from a plain, DDP or FSDP2 module (for FSDP2 a
    collective: every rank calls it)."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        module = module.module
    return {k: v.cpu() for k, v in full_tensors(module.state_dict(), keep=True).items()}


@contextlib.contextmanager
def gradient_sync(net: nn.Module, *, sync: bool) -> Iterator[None]:
    """Gradient accumulation: micro-batches but the last (`sync` False) skip the gradients' reduction across
    ranks and accumulate locally. DDP: `no_sync()`; FSDP2: `set_requires_gradient_sync(False)` (no
    reduce-scatter; the unsharded gradients accumulate until the last micro-batch reduces them)."""
    if sync:
        yield
    elif isinstance(net, nn.parallel.DistributedDataParallel):
        with net.no_sync():
            yield
    elif hasattr(net, "set_requires_gradient_sync"):  # an FSDP2 module (fully_shard)
        net.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            net.set_requires_gradient_sync(True)
    else:  # one process, unwrapped: nothing to synchronise
        yield


def weight_checksum(params: list[nn.Parameter]) -> float:
    """The sum of |w| over all weights, in float64 (train.log_sample_keys' audit). FSDP2's DTensor shards are
    summed on each rank, then over the ranks (a collective: every rank calls it); whole tensors as they are."""
    from torch.distributed.tensor import DTensor

    sharded = [p for p in params if isinstance(p, DTensor)]
    whole = sum(p.detach().double().abs().sum().item() for p in params if not isinstance(p, DTensor))
    if not sharded:
        return whole
    shards = torch.stack([p.detach().to_local().double().abs().sum() for p in sharded]).sum()
    dist.all_reduce(shards)
    return whole + shards.item()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def gather_per_rank(obj: object, world: Dist) -> list:
    """Every rank's `obj` (picklable), in rank order: a collective under torchrun, so every rank calls it."""
    if world.world_size == 1 or not dist.is_initialized():
        return [obj]
    gathered: list = [None] * world.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def rng_state(device: torch.device) -> dict[str, list[int]]:
    """This rank's generator state (t and noise draws): the CPU one, and the GPU's on CUDA, as int lists (they
    load under `torch.load(weights_only=True)`)."""
    state = {"cpu": torch.get_rng_state().tolist()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def restore_rng(state: dict[str, list[int]], device: torch.device) -> None:
    torch.set_rng_state(torch.tensor(state["cpu"], dtype=torch.uint8))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)


# What gloo, NCCL and the c10d store say when a peer process is gone or stuck (the exception types vary: plain
# RuntimeError from gloo's transport, DistBackendError / DistNetworkError / DistStoreError from c10d).
_LOST_PEER = ("connection reset by peer", "connection closed by peer", "broken pipe", "connection refused",
              "timed out", "timeout", "nccl communicator was aborted", "socket")


def lost_peer(exc: BaseException, world_size: int) -> bool:
    """Whether `exc`, raised in a run of `world_size` processes, means another rank died or hung (a node, a
    worker)."""
    if world_size == 1 or not isinstance(exc, RuntimeError):  # the torch.distributed errors are RuntimeErrors
        return False
    text = str(exc).lower()
    return type(exc).__name__.startswith("Dist") or any(marker in text for marker in _LOST_PEER)
