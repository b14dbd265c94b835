"""Training-run checkpoints: one folder per step, made complete before it becomes visible.

A checkpoint is written into `checkpoints/.tmp-step_XXXXXXXX/` and then renamed to
`checkpoints/step_XXXXXXXX/` (a rename within a folder is atomic), so a run killed at any moment
leaves only complete checkpoints behind; `latest` finds the newest of them.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from common.checkpoint import load_state_dict_checked, read_checkpoint, save_checkpoint
from common.errors import InputError
from ldm.model import LatentDiffusion
from ldm.training.distributed import state_of
from ldm.training.ema import EMA

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def write_checkpoint_dir(root: Path, step: int, write: Callable[[Path], None], *, keep: int = 2) -> Path:
    """Call `write(tmp_folder)` to fill a new checkpoint, publish it atomically, prune old ones."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    (tmp / "COMPLETE").write_text(f"{step}\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "COMPLETE").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def checkpoint_to_resume(root: Path, *, resume: bool) -> Path | None:
    """With --resume, the newest complete checkpoint under `root` (None: there is none yet). Without it,
    an InputError if the run folder already holds one: a new run never mixes with an old one."""
    latest = latest_checkpoint(root)
    if not resume and latest is not None:
        raise InputError(f"{root.parent} already holds checkpoints: pass --resume to continue, or choose a new --out")
    return latest if resume else None


def write_training_checkpoint(root: Path, step: int, model: LatentDiffusion, trainable_state: dict[str, torch.Tensor],
                              ema: EMA, optimizer: torch.optim.Optimizer, scaler, *, keep: int) -> Path:
    """Rank 0: `model.safetensors` (raw), `ema.safetensors` (EMA weights: the one to use), `train_state.pt`.

    No RNG state is stored: each rank reseeds from (seed, rank, step) on resume, which is the same on
    every rank count and needs no per-rank files."""

    def write(folder: Path) -> None:
        meta = {"step": step}
        model_state = _merged_state(model, trainable_state)
        save_checkpoint(folder / "model.safetensors", model_state,
                        {"kind": "latent_diffusion", "config": model.config.to_json(), **meta})
        ema_state = _merged_state(model, {k: v for k, v in ema.shadow.items()})
        save_checkpoint(folder / "ema.safetensors", ema_state,
                        {"kind": "latent_diffusion", "config": model.config.to_json(), "ema": "true", **meta})
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "ema_num_updates": ema.num_updates}, folder / "train_state.pt")

    return write_checkpoint_dir(root, step, write, keep=keep)


def save_training_checkpoint(root: Path, step: int, model: LatentDiffusion, net: nn.Module, ema: EMA,
                             optimizer: torch.optim.Optimizer, scaler, *, keep: int, is_main: bool) -> None:
    """Called on every rank: each gathers the trained weights (a collective under FSDP), rank 0 writes
    them with `write_training_checkpoint`, and all ranks wait until it has."""
    trainable_state = state_of(net)
    if is_main:
        write_training_checkpoint(root, step, model, trainable_state, ema, optimizer, scaler, keep=keep)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _merged_state(model: LatentDiffusion, trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole LatentDiffusion state with the trainable parts' weights swapped in."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for key, value in trainable.items():
        state[key] = value.detach().cpu().to(state[key].dtype)
    return state


def restore_training_checkpoint(folder: Path, trainable: nn.Module, ema: EMA, optimizer, scaler) -> int:
    """Load raw weights, EMA, optimizer and scaler; returns the step. Every rank reads the same files."""
    tensors, _ = read_checkpoint(folder / "model.safetensors")
    own = {k: v for k, v in tensors.items() if k.split(".")[0] in ("denoiser", "text_encoder")}
    target = trainable.module if isinstance(trainable, nn.parallel.DistributedDataParallel) else trainable
    load_state_dict_checked(target, {k: v for k, v in own.items() if k in target.state_dict()},
                            source=str(folder / "model.safetensors"))
    ema_tensors, _ = read_checkpoint(folder / "ema.safetensors")
    state = torch.load(folder / "train_state.pt", map_location="cpu", weights_only=True)
    ema.load_state_dict({k: ema_tensors[k] for k in ema.shadow})
    ema.num_updates = int(state["ema_num_updates"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    return int(state["step"])


def export_ema(path: Path, model: LatentDiffusion, ema: EMA) -> None:
    """The final model for `ldm.load_model` / `txt2img.py --ckpt`: the EMA weights, config inside."""
    save_checkpoint(path, _merged_state(model, dict(ema.shadow)),
                    {"kind": "latent_diffusion", "config": model.config.to_json(), "ema": "true"})
