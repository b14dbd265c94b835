"""Pieces of latent diffusion training that tools/train_ldm.py strings together.

Process setup for torchrun (DDP on NCCL for GPUs, gloo for CPU), the typed training config, the
module that is optimised (denoiser + trainable text encoder), checkpoints (written by rank 0 only,
atomically) and the learning-rate schedule. The loop itself reads top to bottom in the tool.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from autoencoder.config import check_keys, coerce_numbers
from autoencoder.errors import InputError

from .checkpoint import load_state_dict_checked, read_checkpoint, save_checkpoint
from .ema import EMA
from .model import LatentDiffusion
from .run_checkpoints import write_checkpoint_dir


@dataclass
class TrainConfig:
    image_size: int = 32
    batch_size: int = 16                # per process
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 500
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    max_steps: int = 10_000
    ema_decay: float = 0.9999
    ema_start: int = 0
    precision: str = "auto"             # auto (bf16 on CUDA), fp32, bf16, fp16 (with a grad scaler)
    gradient_checkpointing: bool = False
    fsdp: bool = False                  # shard the denoiser (CUDA); DDP otherwise
    caption_dropout: float = 0.1        # the empty caption, for classifier-free guidance
    loss_type: str = "l2"
    min_snr_gamma: float | None = None
    offset_noise: float = 0.0
    log_every: int = 50
    sample_every: int = 1000
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    log_sample_keys: bool = False       # write OUT/sample_keys/rank{r}.tsv: keys seen and a weight checksum per step
    num_workers: int = 2
    shuffle_buffer: int = 1000
    resampled: bool = True              # endless shards drawn with replacement; false: split by rank, once per pass
    seed: int = 0
    sample_prompts: list[str] = field(default_factory=lambda: ["a red apple", "a yellow star"])
    sample_steps: int = 25
    sample_scale: float = 5.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        check_keys(cls, d, "train")
        config = cls(**d)
        coerce_numbers(config, "train")
        config.adam_betas = tuple(float(b) for b in config.adam_betas)
        if config.min_snr_gamma is not None:
            config.min_snr_gamma = float(config.min_snr_gamma)
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "sample_every", "ckpt_every"):
            if getattr(config, name) < 1:
                raise InputError(f"train config: {name} must be >= 1, got {getattr(config, name)}")
        if not 0 <= config.caption_dropout <= 1:
            raise InputError(f"train config: caption_dropout must be in [0, 1], got {config.caption_dropout}")
        return config


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


class Trainable(nn.Module):
    """What the optimiser updates: the denoiser and, for from-scratch models, the text encoder.

    `forward(x_t, t, tokens)` encodes the tokens (with gradients when the text encoder trains) and
    runs the denoiser, so DDP sees one module and one forward per micro-batch.
    """

    def __init__(self, denoiser: nn.Module, text_encoder: nn.Module | None, train_text: bool):
        super().__init__()
        self.denoiser = denoiser
        self.text_encoder = text_encoder if train_text else None
        # Not registered as a submodule: a frozen encoder is neither optimised, nor averaged, nor wrapped by DDP.
        object.__setattr__(self, "_frozen_text", None if train_text else text_encoder)

    def context(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.text_encoder is not None:
            return self.text_encoder(tokens)
        with torch.no_grad():
            return self._frozen_text(tokens)

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        return self.denoiser(x, t, self.context(tokens) if context is None else context)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to `lr`, then constant (as the LDM/SD training configs)."""
    return config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))


def load_model_config(raw: dict[str, Any]):
    """`model:` section -> (LDMConfig, frozen autoencoder state dict or None)."""
    from .config import LDMConfig
    from .loading import load_autoencoder

    section = dict(raw)
    ae_state = None
    ae_ckpt = section.pop("autoencoder_ckpt", None)
    diffusion = dict(section.pop("diffusion", None) or {})
    if ae_ckpt:
        autoencoder = load_autoencoder(ae_ckpt)
        section["autoencoder"] = autoencoder.config.to_dict()
        ae_state = autoencoder.state_dict()
    elif "autoencoder" not in section:
        raise InputError("model config: give autoencoder_ckpt (a trained autoencoder) or an autoencoder section")
    return LDMConfig.from_dict({**section, **diffusion}), ae_state


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


def timestep_buckets(losses: torch.Tensor, t: torch.Tensor, num_timesteps: int, buckets: int = 4) -> dict[str, float]:
    """Mean loss per timestep range (t in [0, T/4), [T/4, T/2), ...), for the log."""
    out = {}
    edges = torch.linspace(0, num_timesteps, buckets + 1)
    for i in range(buckets):
        sel = (t >= edges[i]) & (t < edges[i + 1])
        if sel.any():
            out[f"loss_t{int(edges[i])}-{int(edges[i + 1]) - 1}"] = losses[sel].mean().item()
    return out


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value
