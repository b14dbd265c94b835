"""Which timesteps (and noise levels) a sampler visits, as the original code and diffusers choose them."""
from __future__ import annotations

import torch

from ldm.diffusion.schedule import NoiseSchedule


def ddim_timesteps(num_train: int, steps: int) -> torch.Tensor:
    """The original SD DDIMSampler's "uniform" subsequence, descending: range(0, T, T // steps) + 1.

    For S=50: 981, 961, ..., 1; the model never sees t=0. When S does not divide T this gives
    len(range(0, T, T // S)) steps, as the original does (S=30 gives 31). Where the +1 offset would
    step past T-1 (S > T/2) the offset is dropped, so S=T visits every step T-1..0 (the original
    would index out of range there).
    """
    timesteps = torch.arange(0, num_train, num_train // steps) + 1
    if timesteps[-1] >= num_train:
        timesteps = timesteps - 1
    return timesteps.flip(0)


def leading_timesteps(num_train: int, steps: int) -> torch.Tensor:
    """diffusers' `timestep_spacing="leading"`, `steps_offset=1`: arange(steps) * (T // steps) + 1, descending.

    Equal to `ddim_timesteps` whenever `steps` divides T; always exactly `steps` long.
    """
    timesteps = torch.arange(steps) * (num_train // steps) + 1
    if timesteps[-1] >= num_train:
        timesteps = timesteps - 1
    return timesteps.flip(0)


def dpm_solver_timesteps(num_train: int, steps: int) -> torch.Tensor:
    """DPMSolverMultistepScheduler's "leading" spacing: ratio T // (steps + 1), +1 offset, descending."""
    ratio = num_train // (steps + 1)
    timesteps = (torch.arange(steps + 1) * ratio).flip(0)[:-1] + 1
    if timesteps[0] >= num_train:
        timesteps = timesteps - 1
    return timesteps


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Noise levels spaced as in Karras et al. 2022, eq. 5, descending, float64."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def sigma_to_t(sigmas: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Fractional timesteps of noise levels, by linear interpolation in log sigma (k-diffusion, diffusers)."""
    log_sigmas = schedule.sigmas.log()
    log_sigma = sigmas.double().clamp(min=1e-10).log()
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low = (dists >= 0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high])).clamp(0, 1)
    return (1 - w) * low + w * high
