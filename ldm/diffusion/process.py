"""The forward process q(x_t | x_0) and its posterior (DDPM eqs. 4, 6-7), as pure functions of a NoiseSchedule
or of one noise level."""
from __future__ import annotations

import torch

from ldm.diffusion.schedule import NoiseSchedule


def extract(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] shaped (B, 1, 1, ...) to broadcast against `like`, in its dtype and device."""
    values = table.to(like.device)[t.to(like.device).long()]
    return values.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps  (DDPM eq. 4)."""
    return extract(schedule.sqrt_alphas_cumprod, t, x0) * x0 + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def noise_to_level(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """x = sqrt(a) x_0 + sqrt(1 - a) noise at one level a = alpha_bar for the whole batch (DDPM eq. 4)."""
    return alpha_bar ** 0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise


def noise_to_sigma(x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """The same state in the variance-exploding view: x = x_0 + sigma noise (Karras et al. 2022, sec. 2), which is
    `noise_to_level` times sqrt(sigma^2 + 1) for sigma = sqrt((1 - a) / a)."""
    return x0 + sigma * noise


def q_posterior(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor,
                t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)  (DDPM eqs. 6-7)."""
    mean = extract(schedule.posterior_mean_coef1, t, x_t) * x0 + extract(schedule.posterior_mean_coef2, t, x_t) * x_t
    return mean, extract(schedule.posterior_variance, t, x_t), extract(schedule.posterior_log_variance_clipped, t, x_t)
