"""Sharded training (`train.fsdp`): FSDP2 wrapping, sharded checkpoints, and the EMA weights gathered to use.

- `shard_trainable`: PyTorch's `fully_shard` (FSDP2) on each repeated block (every direct child of a module
  named in `REPEATED`: the UNet's input / middle / output blocks, the DiT's blocks, a trained text encoder's
  transformer blocks), then on the root `Trainable` (the rest: embeddings, norms, the output layer). Each rank
  keeps a 1/N shard of every parameter, gradient and optimizer state (DTensors, dim 0); a block's weights are
  all-gathered for its forward and backward and freed after; gradients are reduce-scattered (averaged, as DDP
  averages). CPU (gloo) and CUDA (nccl); one process shards over a 1-rank group.
- A checkpoint folder `step_XXXXXXXX/` holds `dcp/` (a `torch.distributed.checkpoint` directory: the raw
  weights, the optimizer state and the EMA shadows as shards, with the step, the EMA's update count and the
  grad scaler as `train_state`), written by every rank at once (`__<rank>_0.distcp` each, `.metadata` by
  rank 0), and `frozen.safetensors` (rank 0: the weights the run does not train, the autoencoder and a frozen
  text encoder, with the model config), made complete and published as `checkpoints.write_checkpoint_dir` does.
  DCP reshards on load, so a checkpoint resumes on any number of ranks.
- `ema_weights`: the EMA weights gathered into an unsharded copy on rank 0 (sampling and evaluation run there).
- `read_training_checkpoint`: a checkpoint folder as one state dict of our single-file format, without a process
  group (tools/convert_checkpoint.py).
"""
from __future__ import annotations

import contextlib
import copy
import json
import warnings
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from common.checkpoint import (
    empty_parameters,
    load_state_dict_checked,
    read_checkpoint,
    save_checkpoint,
    save_pickle,
)
from common.errors import InputError
from ldm.model import LatentDiffusion
from ldm.training.checkpoints import (
    MARKER,
    RESUME_FILE,
    abandon_checkpoint_dir,
    begin_checkpoint_dir,
    checkpoint_problem,
    partial_dir,
    publish_checkpoint_dir,
    seal_checkpoint_dir,
)
from ldm.training.distributed import Dist, barrier, ensure_process_group, full_tensors
from ldm.training.ema import EMA
from ldm.training.trainable import Trainable

REPEATED = ("input_blocks", "middle_block", "output_blocks", "blocks", "resblocks", "layers")
DCP_DIR = "dcp"
FROZEN = "frozen.safetensors"


# Wrapping.

def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The direct children of every ModuleList / Sequential named in `REPEATED` (outermost ones only)."""
    blocks, taken = [], []
    for name, child in module.named_modules():
        if any(name.startswith(prefix + ".") for prefix in taken):
            continue
        if name.rsplit(".", 1)[-1] in REPEATED and isinstance(child, (nn.ModuleList, nn.Sequential)):
            blocks += list(child.children())
            taken.append(name)
    return blocks


def shard_trainable(trainable: Trainable, world: Dist) -> Trainable:
    """`fully_shard` each repeated block, then the root (in place; the same module is returned). With one
    process, a 1-rank group is made and the module is "sharded" over it, so every code path is the same."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ensure_process_group(world)
    mesh = init_device_mesh(world.device.type, (world.world_size,))
    blocks = repeated_blocks(trainable)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(trainable, mesh=mesh)
    if world.is_main:
        print(f"train.fsdp: FSDP2 (fully_shard) over {world.world_size} rank(s), {dist.get_backend()}: "
              f"{len(blocks)} blocks sharded one by one, the rest of the trained module as one unit", flush=True)
    return trainable


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


# Checkpoints.

def _dcp_state(net: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer, train_state: str) -> dict:
    """What DCP saves and loads in place: shards of the weights (and buffers), the optimizer state and the EMA
    shadows, and `train_state` (JSON: step, EMA update count, grad scaler)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(net), "optimizer": get_optimizer_state_dict(net, optimizer),
            "ema": dict(ema.shadow), "train_state": train_state}


def save_sharded_checkpoint(root: Path, step: int, model: LatentDiffusion, net: nn.Module, ema: EMA,
                            optimizer: torch.optim.Optimizer, scaler, *, keep: int, is_main: bool,
                            resume: dict | None = None) -> None:
    """Called on every rank (a collective): rank 0 begins `.tmp-step_*`, every rank writes its shards into
    its `dcp/`, rank 0 adds `frozen.safetensors`, seals the folder (the `COMPLETE` marker, with every file's
    size) and publishes it (rename, prune); then all ranks go on."""
    train_state = json.dumps({"step": step, "ema_num_updates": ema.num_updates, "scaler": scaler.state_dict()})
    state = _dcp_state(net, ema, optimizer, train_state)
    if is_main:
        begin_checkpoint_dir(root, step)
    barrier()
    tmp = partial_dir(root, step)
    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp / DCP_DIR), no_dist=not dist.is_initialized())
        if is_main:
            frozen = {k: v for k, v in model.state_dict().items() if k not in ema.shadow}
            save_checkpoint(tmp / FROZEN, frozen, {"kind": "latent_diffusion", "config": model.config.to_json(),
                                                   "step": step, "part": "frozen"})
            save_pickle(tmp / RESUME_FILE, resume or {})  # per-rank data positions and RNG states
            seal_checkpoint_dir(tmp, step)
    except BaseException as exc:
        if is_main:
            abandon_checkpoint_dir(root, step, exc)
        raise
    if is_main:
        publish_checkpoint_dir(root, step, keep=keep)
    barrier()


def restore_sharded_checkpoint(folder: Path, net: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
                               scaler) -> int:
    """Every rank loads its shards of weights, optimizer state and EMA from `folder/dcp` (resharded to this
    run's number of ranks); returns the step."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if not (folder / DCP_DIR / ".metadata").is_file():
        raise InputError(f"{folder} is not a sharded checkpoint (it was written with train.fsdp=false): resume it "
                         "with train.fsdp=false")
    state = _dcp_state(net, ema, optimizer, "")
    try:
        dcp.load(state, checkpoint_id=folder / DCP_DIR)
    except Exception as exc:  # DCP wraps each rank's error (missing keys, other shapes) in CheckpointException
        raise InputError(f"{folder} does not fit this model ({_first_line(exc)}); resume with the run's own "
                         "config") from None
    set_model_state_dict(net, state["model"])
    set_optimizer_state_dict(net, optimizer, state["optimizer"])  # the EMA shadows were loaded in place
    train = json.loads(state["train_state"])
    ema.num_updates = int(train["ema_num_updates"])
    scaler.load_state_dict(train["scaler"])
    return int(train["step"])


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# The EMA weights, gathered.

@contextlib.contextmanager
def ema_weights(model: LatentDiffusion, trainable: nn.Module, ema: EMA, *,
                is_main: bool) -> Iterator[tuple[LatentDiffusion, nn.Module, EMA] | None]:
    """(model, trainable, ema) for rank 0 to sample and evaluate with (`ema.applied_to(trainable)`), None on
    the other ranks. Unsharded: the run's own. Sharded: a collective on every rank; rank 0 gets an unsharded
    copy of the trained module holding the gathered EMA weights, swapped into `model` meanwhile, so sampling
    runs there alone with no collective (the sharded module's forward would all-gather on every rank)."""
    if not is_sharded(trainable):
        yield (model, trainable, ema) if is_main else None
        return
    weights = full_tensors(ema.shadow, keep=is_main)
    if not is_main:
        yield None
        return
    plain = _unsharded_copy(model, trainable, weights)
    plain_ema = copy.copy(ema)
    plain_ema.shadow = weights  # the copy's own parameters: applying it changes nothing
    kept = model.denoiser, model.text_encoder
    model.denoiser = plain.denoiser
    if plain.text_encoder is not None:
        model.text_encoder = plain.text_encoder
    try:
        yield model, plain, plain_ema
    finally:
        model.denoiser, model.text_encoder = kept


def _unsharded_copy(model: LatentDiffusion, trainable: nn.Module, weights: dict[str, torch.Tensor]) -> Trainable:
    """A plain `Trainable` built from the model's config (parameters on the meta device, then `weights` as
    its parameters) with the sharded module's buffers (FSDP2 leaves buffers whole)."""
    device = next(iter(weights.values())).device
    with torch.random.fork_rng(devices=[]), empty_parameters():
        fresh = LatentDiffusion(model.config)
    plain = Trainable(fresh.denoiser, fresh.text_encoder if trainable.text_encoder is not None else None)
    names = set(plain.state_dict())
    buffers = {name: buffer for name, buffer in trainable.named_buffers() if name in names}
    load_state_dict_checked(plain, {**buffers, **weights}, source="the gathered EMA weights", assign=True)
    return plain.to(device)


# Export, without a process group.

def is_training_checkpoint(path: str | Path) -> bool:
    """A folder tools/train_ldm.py wrote under checkpoints/ (complete or not, sharded or not)."""
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in (MARKER, DCP_DIR, FROZEN, "train_state.pt"))


def read_training_checkpoint(folder: str | Path, *, ema: bool = True) -> tuple[dict[str, torch.Tensor],
                                                                               dict[str, str]]:
    """(tensors, metadata) of our single-file format from a training checkpoint folder: its EMA weights (the
    raw ones without `ema`) with the rest of the model. A sharded folder's shards are read into full tensors in
    this one process (DCP with no_dist). One-line InputErrors for an incomplete or damaged folder. DCP's
    `.metadata` is a pickle (PyTorch's format, read with `pickle.load`): read only checkpoints you trust."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = Path(folder)
    if not (folder / MARKER).is_file():
        raise InputError(f"{folder} is not a complete training checkpoint (no {MARKER} marker: a write that was "
                         "interrupted, or not a checkpoint folder); use a checkpoints/step_* folder")
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise InputError(f"{folder} is damaged: {problem}")
    if not (folder / DCP_DIR).is_dir():  # a DDP / one-process checkpoint: our format already
        return read_checkpoint(folder / ("ema.safetensors" if ema else "model.safetensors"))
    frozen, metadata = read_checkpoint(folder / FROZEN)
    key = "ema" if ema else "model"
    reader = dcp.FileSystemReader(folder / DCP_DIR)
    try:
        entries = reader.read_metadata().state_dict_metadata
        trained = {name[len(key) + 1:]: torch.empty(entry.size, dtype=entry.properties.dtype)
                   for name, entry in entries.items()
                   if name.startswith(key + ".") and isinstance(entry, TensorStorageMetadata)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is unavailable or uninitialized": as intended
            dcp.load({key: trained}, storage_reader=reader, no_dist=True)
    except Exception as exc:  # a damaged .metadata or shard: pickle, OSError, CheckpointException, ...
        raise InputError(f"{folder / DCP_DIR} is unreadable ({type(exc).__name__}: {_first_line(exc)})") from None
    if not trained:
        raise InputError(f"{folder / DCP_DIR} holds no {key} weights")
    metadata = {k: v for k, v in metadata.items() if k not in ("part", "format")}
    return {**frozen, **trained}, {**metadata, **({"ema": "true"} if ema else {})}
