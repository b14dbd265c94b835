"""The typed `train` sections of the trainers (their shared fields and checks), and the LDM learning-rate schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from common.config import check_keys, coerce_numbers, whole_numbers
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
    ema_warmup: bool = True             # decay min(ema_decay, (1 + n) / (10 + n)) after n updates (LitEma)
    gradient_checkpointing: bool = False
    fsdp: bool = False                  # shard the trained module (FSDP2, CPU or CUDA; training/sharded.py); else DDP
    caption_dropout: float = 0.1        # the empty caption, for classifier-free guidance
    loss_type: str = "l2"
    min_snr_gamma: float | None = None
    offset_noise: float = 0.0
    per_sample_noise: bool = False      # t and noise seeded per (seed, step, sample key), not per rank: the same
                                        # numbers on any rank layout and after a resume (ldm/training/noise.py)
    ckpt_every: int = 1000
    log_sample_keys: bool = False       # write OUT/sample_keys/rank{r}.tsv: keys seen and a weight checksum per step
    shuffle_buffer: int = 1000
    resampled: bool = True              # endless shards drawn with replacement; false: split by rank, once per pass
    buckets: bool = False               # aspect-ratio buckets around image_size (ldm.data.buckets); false: square crops
    bucket_max_ratio: float = 2.0       # the buckets' largest long side / short side
    random_crop: bool = True            # random crops (false: centred), square or bucketed
    random_flip: bool = False           # random horizontal flips (off, as kohya's flip_aug and diffusers' random_flip:
                                        # a flip mirrors text and digits and swaps left / right in captions)
    sample_prompts: list[str] = field(default_factory=lambda: ["a red apple", "a yellow star"])
    sample_steps: int = 25
    sample_scale: float = 5.0
    # Prompt adherence of the EMA weights every eval_every steps (0: off): ldm/training/evaluation.py.
    eval_every: int = 0
    eval_prompts: list[str] | None = None   # None: the sample_prompts
    eval_images_per_prompt: int = 4         # seeds 0 .. n-1 for each prompt
    eval_steps: int | None = None           # None: sample_steps
    eval_scale: float | None = None         # None: sample_scale
    eval_classifier: str | None = None      # TorchScript file: images (B, 3, H, W) in [0, 1] -> logits (B, C)
    eval_labels: list[int] | None = None    # the classifier's class of each eval prompt
    eval_clip: str | None = None            # "ARCH:PATH": an open_clip architecture and a local weights file

    at_least_one: ClassVar[tuple[str, ...]] = ("batch_size", "grad_accum", "max_steps", "log_every", "sample_every",
                                               "ckpt_every", "eval_images_per_prompt")
    positive: ClassVar[tuple[str, ...]] = ("lr", "grad_clip")
    non_negative: ClassVar[tuple[str, ...]] = (*BaseTrainConfig.non_negative, "warmup_steps", "weight_decay",
                                               "offset_noise", "sample_scale", "eval_every")

    def check(self) -> None:
        if self.min_snr_gamma is not None:
            self.min_snr_gamma = float(self.min_snr_gamma)
            if not math.isfinite(self.min_snr_gamma) or self.min_snr_gamma <= 0:
                raise InputError(f"train config: min_snr_gamma must be a number > 0 (5 in the paper) or null, "
                                 f"got {self.min_snr_gamma}")
        if not 0 <= self.caption_dropout <= 1:
            raise InputError(f"train config: caption_dropout must be in [0, 1], got {self.caption_dropout}")
        for name in ("buckets", "random_crop", "random_flip", "ema_warmup", "per_sample_noise"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"train config: {name} is true or false, got {getattr(self, name)!r}")
        if not isinstance(self.fsdp, bool):
            raise InputError(f"train config: fsdp is true or false, got {self.fsdp!r}")
        if self.fsdp and self.precision == "fp16":  # GradScaler's inf check would run on each rank's shard alone
            raise InputError("train config: fsdp does not take precision fp16 (its gradient scaler does not agree "
                             "across shards); use bf16 or fp32")
        if self.bucket_max_ratio < 1:
            raise InputError(f"train config: bucket_max_ratio must be a number >= 1 (long side / short side), "
                             f"got {self.bucket_max_ratio}")
        self.check_evaluation()

    def check_evaluation(self) -> None:
        """The eval_* keys' values and how they fit together; the files are read by ldm/training/evaluation.py."""
        prompts = self.sample_prompts if self.eval_prompts is None else self.eval_prompts
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"train config: eval_prompts must be a non-empty list of prompts or null (the "
                             f"sample_prompts), got {prompts!r}")
        self._optional_number("eval_steps", whole=True, low=1, fallback="the sample_steps")
        self._optional_number("eval_scale", whole=False, low=0, fallback="the sample_scale")
        for name in ("eval_classifier", "eval_clip"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                what = "a TorchScript file" if name == "eval_classifier" else "ARCH:PATH (open_clip)"
                raise InputError(f"train config: {name} must be {what} or null, got {value!r}")
        if self.eval_labels is not None:
            self.eval_labels = list(whole_numbers(self.eval_labels, "train config", "eval_labels"))
            if self.eval_classifier is None:
                raise InputError("train config: eval_labels are class indices of eval_classifier; set "
                                 "eval_classifier (a TorchScript file) or drop eval_labels")
            if len(self.eval_labels) != len(prompts):
                raise InputError(f"train config: eval_labels has {len(self.eval_labels)} entries for {len(prompts)} "
                                 "eval prompts; give one class index per prompt, in the prompts' order")
            if min(self.eval_labels) < 0:
                raise InputError(f"train config: eval_labels must be class indices >= 0, got {self.eval_labels}")
        elif self.eval_classifier is not None:
            raise InputError(f"train config: eval_classifier needs eval_labels, one class index per eval prompt "
                             f"({len(prompts)} prompts)")
        if self.eval_clip is not None:
            arch, _, path = self.eval_clip.partition(":")
            if not arch or not path:
                raise InputError(f"train config: eval_clip must be ARCH:PATH, an open_clip architecture and a local "
                                 f"weights file (e.g. ViT-B-32:/models/open_clip_pytorch_model.bin), "
                                 f"got {self.eval_clip!r}")
        if self.eval_every and self.eval_classifier is None and self.eval_clip is None:
            raise InputError(f"train config: eval_every {self.eval_every} needs a metric; set eval_classifier (with "
                             "eval_labels) or eval_clip, or eval_every 0")

    def _optional_number(self, name: str, *, whole: bool, low: float, fallback: str) -> None:
        """A field that is a number (a whole one with `whole`) >= `low`, or None for `fallback`."""
        value = getattr(self, name)
        if value is None:
            return
        try:
            number = math.nan if isinstance(value, bool) else float(value)  # "5": YAML 1.1 reads some numbers so
        except (TypeError, ValueError, OverflowError):
            number = math.nan
        if not (math.isfinite(number) and number >= low and (not whole or number.is_integer())):
            raise InputError(f"train config: {name} must be {'a whole number' if whole else 'a number'} >= {low} or "
                             f"null ({fallback}), got {value!r}")
        setattr(self, name, int(number) if whole else number)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to `lr`, then constant (as the LDM/SD training configs)."""
    return config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
