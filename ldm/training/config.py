"""The typed training config of tools/train_ldm.py, and its learning-rate schedule."""
from __future__ import annotations
from dataclasses import dataclass, field
from typing import Any
from common.config import check_keys, coerce_numbers
from common.errors import InputError


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


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to `lr`, then constant (as the LDM/SD training configs)."""
    return config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
