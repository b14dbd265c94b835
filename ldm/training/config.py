"""The typed `train` sections of the trainers (their shared fields and checks), and the LDM learning-rate schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from common.config import check_keys, coerce_numbers
from common.errors import InputError

Config = TypeVar("Config", bound="BaseTrainConfig")


@dataclass
class BaseTrainConfig:
    """The fields every trainer's `train` section has, with the defaults they share, and `from_dict`.

    Each trainer subclasses it with its own fields (and its own sizes: image size, batch, steps, EMA decay)."""

    adam_betas: tuple[float, float] = (0.9, 0.999)
    ema_start: int = 0
    precision: str = "auto"             # auto, fp32, bf16, fp16 (CUDA, with a grad scaler): ldm/training/precision.py
    log_every: int = 50
    sample_every: int = 1000
    keep_checkpoints: int = 2
    num_workers: int = 2
    seed: int = 0

    at_least_one: ClassVar[tuple[str, ...]] = ()  # sizes and periods: 0 would divide by zero or train nothing
    positive: ClassVar[tuple[str, ...]] = ()  # learning rates and the like: > 0 and finite
    non_negative: ClassVar[tuple[str, ...]] = ("ema_start", "keep_checkpoints", "num_workers")  # >= 0 and finite

    @classmethod
    def from_dict(cls: type[Config], d: dict[str, Any]) -> Config:
        """The section from its YAML mapping: unknown keys, non-numbers and bad values are one-line InputErrors."""
        check_keys(cls, d, "train")
        config = cls(**d)
        coerce_numbers(config, "train")
        config.adam_betas = tuple(float(b) for b in config.adam_betas)
        for name in cls.at_least_one:
            if getattr(config, name) < 1:
                raise InputError(f"train config: {name} must be >= 1, got {getattr(config, name)}")
        for name in cls.positive:
            if getattr(config, name) <= 0:  # finite already: coerce_numbers refuses NaN / inf
                raise InputError(f"train config: {name} must be a number > 0, got {getattr(config, name)}")
        for name in cls.non_negative:
            if getattr(config, name) < 0:
                raise InputError(f"train config: {name} must be a number >= 0, got {getattr(config, name)}")
        if not all(0 <= b < 1 for b in config.adam_betas) or len(config.adam_betas) != 2:
            raise InputError(f"train config: adam_betas must be two numbers in [0, 1), got {list(config.adam_betas)}")
        if not 0 <= getattr(config, "ema_decay", 0) <= 1:
            raise InputError(f"train config: ema_decay must be in [0, 1], got {config.ema_decay}")
        from ldm.training.precision import check_precision  # here: it imports torch
        check_precision(config.precision)
        config.check()
        return config

    def check(self) -> None:
        """A trainer's own checks, after the shared ones (InputError on a bad value)."""


@dataclass
class TrainConfig(BaseTrainConfig):
    """tools/train_ldm.py's `train` section."""

    image_size: int = 32
    batch_size: int = 16                # per process
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 500
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_steps: int = 10_000
    ema_decay: float = 0.9999
    gradient_checkpointing: bool = False
    fsdp: bool = False                  # shard the denoiser (CUDA); DDP otherwise
    caption_dropout: float = 0.1        # the empty caption, for classifier-free guidance
    loss_type: str = "l2"
    min_snr_gamma: float | None = None
    offset_noise: float = 0.0
    ckpt_every: int = 1000
    log_sample_keys: bool = False       # write OUT/sample_keys/rank{r}.tsv: keys seen and a weight checksum per step
    shuffle_buffer: int = 1000
    resampled: bool = True              # endless shards drawn with replacement; false: split by rank, once per pass
    buckets: bool = False               # aspect-ratio buckets around image_size (ldm.data.buckets); false: square crops
    bucket_max_ratio: float = 2.0       # the buckets' largest long side / short side
    random_crop: bool = True            # random crops (false: centred), square or bucketed
    sample_prompts: list[str] = field(default_factory=lambda: ["a red apple", "a yellow star"])
    sample_steps: int = 25
    sample_scale: float = 5.0

    at_least_one: ClassVar[tuple[str, ...]] = ("batch_size", "grad_accum", "max_steps", "log_every", "sample_every",
                                               "ckpt_every")
    positive: ClassVar[tuple[str, ...]] = ("lr", "grad_clip")
    non_negative: ClassVar[tuple[str, ...]] = (*BaseTrainConfig.non_negative, "warmup_steps", "weight_decay",
                                               "offset_noise", "sample_scale")

    def check(self) -> None:
        if self.min_snr_gamma is not None:
            self.min_snr_gamma = float(self.min_snr_gamma)
            if not math.isfinite(self.min_snr_gamma) or self.min_snr_gamma <= 0:
                raise InputError(f"train config: min_snr_gamma must be a number > 0 (5 in the paper) or null, "
                                 f"got {self.min_snr_gamma}")
        if not 0 <= self.caption_dropout <= 1:
            raise InputError(f"train config: caption_dropout must be in [0, 1], got {self.caption_dropout}")
        for name in ("buckets", "random_crop"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"train config: {name} is true or false, got {getattr(self, name)!r}")
        if self.bucket_max_ratio < 1:
            raise InputError(f"train config: bucket_max_ratio must be a number >= 1 (long side / short side), "
                             f"got {self.bucket_max_ratio}")


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to `lr`, then constant (as the LDM/SD training configs)."""
    return config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
