"""The forward process, the three parameterizations, and the DDPM training objective.

Pure functions of a `NoiseSchedule` and tensors; the network is passed in as `model_fn(x_t, t)`.
"""
from __future__ import annotations

from typing import Callable

import torch

from autoencoder.errors import InputError

from .schedule import NoiseSchedule

PARAMETERIZATIONS = ("eps", "v", "x0")
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def extract(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] shaped (B, 1, 1, ...) to broadcast against `like`, in its dtype and device."""
    values = table.to(like.device)[t.to(like.device).long()]
    return values.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps  (DDPM eq. 4)."""
    return extract(schedule.sqrt_alphas_cumprod, t, x0) * x0 + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def q_posterior(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor,
                t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)  (DDPM eqs. 6-7)."""
    mean = extract(schedule.posterior_mean_coef1, t, x_t) * x0 + extract(schedule.posterior_mean_coef2, t, x_t) * x_t
    return mean, extract(schedule.posterior_variance, t, x_t), extract(schedule.posterior_log_variance_clipped, t, x_t)


def check_parameterization(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise InputError(f"parameterization {parameterization!r} is not one of {', '.join(PARAMETERIZATIONS)}")


# Conversions. `alpha_bar` broadcasts against x_t; x_t = sqrt(a) x0 + sqrt(1-a) eps and
# v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho 2022, sec. 4 and app. D).
def predict_x0(x_t: torch.Tensor, output: torch.Tensor, alpha_bar: torch.Tensor, parameterization: str) -> torch.Tensor:
    """x0 from the model output: (x_t - sqrt(1-a) eps) / sqrt(a), sqrt(a) x_t - sqrt(1-a) v, or x0 itself."""
    if parameterization == "eps":
        return (x_t - (1 - alpha_bar).sqrt() * output) / alpha_bar.sqrt()
    if parameterization == "v":
        return alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * output
    if parameterization == "x0":
        return output
    raise InputError(f"parameterization {parameterization!r} is not one of {', '.join(PARAMETERIZATIONS)}")


def predict_eps(x_t: torch.Tensor, output: torch.Tensor, alpha_bar: torch.Tensor, parameterization: str) -> torch.Tensor:
    """eps from the model output: eps itself, sqrt(a) v + sqrt(1-a) x_t, or (x_t - sqrt(a) x0) / sqrt(1-a)."""
    if parameterization == "eps":
        return output
    if parameterization == "v":
        return alpha_bar.sqrt() * output + (1 - alpha_bar).sqrt() * x_t
    if parameterization == "x0":
        return (x_t - alpha_bar.sqrt() * output) / (1 - alpha_bar).sqrt()
    raise InputError(f"parameterization {parameterization!r} is not one of {', '.join(PARAMETERIZATIONS)}")


def model_target(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor, parameterization: str) -> torch.Tensor:
    """What a model of this parameterization should output for x_t made from (x0, eps)."""
    if parameterization == "eps":
        return eps
    if parameterization == "v":
        return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0
    if parameterization == "x0":
        return x0
    raise InputError(f"parameterization {parameterization!r} is not one of {', '.join(PARAMETERIZATIONS)}")


def min_snr_weight(alpha_bar: torch.Tensor, gamma: float, parameterization: str) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, eq. 9 and sec. 3.4), per parameterization.

    With SNR = a / (1 - a): eps-loss weight min(SNR, g) / SNR, v-loss min(SNR, g) / (SNR + 1),
    x0-loss min(SNR, g).
    """
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    return {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[parameterization]


def diffusion_loss(model_fn: ModelFn, x0: torch.Tensor, schedule: NoiseSchedule, *, parameterization: str,
                   loss_type: str = "l2", min_snr_gamma: float | None = None, offset_noise: float = 0.0,
                   t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample training losses and the timesteps drawn (DDPM Algorithm 1, "simple" loss).

    t ~ U{0..T-1}, eps ~ N(0, I) (+ `offset_noise` * a per-channel constant, Guttenberg 2023),
    x_t by eq. 4, and the MSE (or L1) between the model output and its target, averaged over all
    but the batch dimension; optional min-SNR-gamma weights. Callers can bucket the losses by t.
    """
    check_parameterization(parameterization)
    if loss_type not in ("l2", "l1"):
        raise InputError(f"loss_type {loss_type!r} is not one of l2, l1")
    batch = x0.shape[0]
    if t is None:
        t = torch.randint(0, schedule.num_timesteps, (batch,), generator=generator, device="cpu").to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device="cpu", dtype=x0.dtype).to(x0.device)
        if offset_noise:
            offset = torch.randn((*x0.shape[:2], *([1] * (x0.ndim - 2))), generator=generator, device="cpu")
            noise = noise + offset_noise * offset.to(x0.device, x0.dtype)
    x_t = q_sample(schedule, x0, t, noise)
    alpha_bar = extract(schedule.alphas_cumprod, t, x0)
    target = model_target(x0, noise, alpha_bar, parameterization)
    output = model_fn(x_t, t)
    error = (output.float() - target.float())
    error = error.pow(2) if loss_type == "l2" else error.abs()
    loss = error.mean(dim=tuple(range(1, x0.ndim)))
    if min_snr_gamma is not None:
        loss = loss * min_snr_weight(alpha_bar.float().flatten(), min_snr_gamma, parameterization)
    return loss, t
