"""`train.precision`: the autocast the trainers run the forward pass and the loss under.

- `fp32`: no autocast.
- `bf16`: `torch.autocast(device, dtype=torch.bfloat16)` around the forward pass and the loss, on CUDA and on the
  CPU. Only the autocast ops (convolutions, matmuls, attention) compute in bf16. The weights, their gradients, the
  optimizer state, the EMA and the loss reductions stay float32, so checkpoints are float32 as in an fp32 run and
  resume the same way. The UNet's GroupNorm32 normalizes in float32; PyTorch's GroupNorm/LayerNorm on a bf16
  input accumulate their statistics in float32 too.
- `fp16`: float16 autocast with a gradient scaler, CUDA only.
- `auto`: bf16 on a CUDA GPU that supports it; on a CPU, bf16 where `AUTO_BF16_ON_CPU` lists the trainer with the
  CPU's native bf16 feature (AVX512_BF16, AMX): where bench/train_precision.py measured bf16 autocast faster than
  fp32 with the same loss curve. fp32 otherwise (README.md, "Training precision").

Generation has its own rule (`ldm.cli.generation_precision`: bf16 weights, no autocast, for large models).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager

import torch

from autoencoder.distributions import DiagonalGaussian
from common.errors import InputError
from common.hardware import cpu_bf16_feature

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TRAINERS = ("ldm", "autoencoder")
# Per trainer, the native bf16 features of a CPU on which `auto` picks bf16 autocast: where bench/train_precision.py
# measured it faster than fp32 with agreeing loss curves, on the default model's recipe (bench/RESULTS.md, an
# AVX512_BF16 EPYC): the LDM step 1.09x fp32's steps/s, loss within 0.05% over 200 steps; the autoencoder step
# 0.90x before the discriminator starts and 1.05x after, 0.96x over the recipe, so fp32. AMX is not measured.
AUTO_BF16_ON_CPU: dict[str, tuple[str, ...]] = {"ldm": ("avx512_bf16",), "autoencoder": ()}


def check_precision(precision: str) -> None:
    """A one-line InputError naming the key and the choices for anything else."""
    if precision not in PRECISIONS:
        raise InputError(f"train config: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def resolve_precision(precision: str, device: torch.device, trainer: str) -> tuple[str, str]:
    """(`fp32`, `bf16` or `fp16`, why): what `train.precision` means for `trainer` (ldm, autoencoder) on `device`;
    InputError for fp16 off CUDA."""
    check_precision(precision)
    if trainer not in TRAINERS:
        raise ValueError(f"trainer {trainer!r} is not one of {', '.join(TRAINERS)}")
    if precision == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return "bf16", "auto: this GPU supports bf16"
            return "fp32", "auto: this GPU has no bf16"
        if device.type == "cpu":
            feature = cpu_bf16_feature()
            if feature is None:
                return "fp32", "auto: this CPU has no native bf16 (avx512_bf16 / amx_bf16)"
            if feature in AUTO_BF16_ON_CPU[trainer]:
                return "bf16", f"auto: this CPU has native bf16 ({feature}), measured faster for {trainer} training"
            return "fp32", (f"auto: this CPU has {feature}, but bf16 autocast did not measure faster for {trainer} "
                            "training (bench/train_precision.py); train.precision=bf16 turns it on")
        return "fp32", f"auto: fp32 on {device.type}"
    if precision == "fp16" and device.type != "cuda":
        raise InputError(f"train.precision=fp16 (float16 autocast with a gradient scaler) is for CUDA GPUs; "
                         f"use bf16 or fp32 on {device.type}")
    if precision == "bf16" and device.type == "cpu" and cpu_bf16_feature() is None:
        return "bf16", "set; this CPU has no native bf16, so it is emulated (slow)"
    return precision, "set"


def training_autocast(precision: str, device: torch.device, trainer: str) -> tuple[str, Callable[[], ContextManager]]:
    """(the resolved precision, a factory of the context the forward pass and the loss run under)."""
    resolved, _ = resolve_precision(precision, device, trainer)
    dtype = DTYPES[resolved]
    if dtype is None:
        return resolved, contextlib.nullcontext
    return resolved, functools.partial(torch.autocast, device.type, dtype=dtype)


def describe_precision(precision: str, device: torch.device, trainer: str) -> str:
    """'bf16 autocast (auto: this CPU has native bf16 ...)', 'fp32 (set)': for the start-up line."""
    resolved, why = resolve_precision(precision, device, trainer)
    return f"{resolved}{' autocast' if resolved != 'fp32' else ''} ({why})"


def float32_posterior(posterior: DiagonalGaussian) -> DiagonalGaussian:
    """The autoencoder's posterior with float32 moments: under bf16 autocast the encoder's moments are bf16, and
    the KL term is a loss reduction (float32 like the others). The same object when it is float32 already."""
    if posterior.mean.dtype == torch.float32:
        return posterior
    return DiagonalGaussian(torch.cat([posterior.mean, posterior.logvar], dim=1).float(),
                            deterministic=posterior.deterministic)
