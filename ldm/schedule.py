"""Noise schedules: betas and the cumulative products derived from them.

Tables are computed in float64 and returned as float32, as the original `register_schedule` does.
"""
from __future__ import annotations

import torch

from autoencoder.errors import InputError

BETA_SCHEDULES = ("linear", "scaled_linear")


def make_betas(schedule: str, timesteps: int, linear_start: float, linear_end: float) -> torch.Tensor:
    """beta_1..beta_T in float64.

    `scaled_linear` is what the original LDM code calls "linear": linear in sqrt(beta)
    (SD: 0.00085 .. 0.012 over 1000 steps). `linear` is DDPM's (Ho et al. 2020, sec. 4) linear in beta.
    """
    if timesteps < 1:
        raise InputError(f"timesteps must be >= 1, got {timesteps}")
    if schedule == "scaled_linear":
        return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    if schedule == "linear":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    raise InputError(f"unknown beta schedule {schedule!r}; valid: {', '.join(BETA_SCHEDULES)}")


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) (DDPM eq. 4), float64 in, float32 out."""
    return torch.cumprod(1.0 - betas.double(), dim=0).float()
