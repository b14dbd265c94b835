"""Which timesteps (and noise levels) a sampler visits, as the original code and diffusers choose them.

The spacings below give timesteps; the `*_plan` functions turn them into each sampler's `Plan`.
"""
from __future__ import annotations

import torch

from common.choices import TIMESTEP_SPACINGS
from ldm.diffusion.schedule import NoiseSchedule
from ldm.samplers.interface import Plan


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


def trailing_timesteps(num_train: int, steps: int) -> torch.Tensor:
    """diffusers' `timestep_spacing="trailing"`: round(arange(T, 0, -T / steps)) - 1, so it starts at T - 1."""
    return torch.arange(num_train, 0, -num_train / steps, dtype=torch.float64).round().long()[:steps] - 1


def linspace_timesteps(num_train: int, steps: int) -> torch.Tensor:
    """diffusers' `timestep_spacing="linspace"`: round(linspace(0, T - 1, steps)), descending."""
    return torch.linspace(0, num_train - 1, steps, dtype=torch.float64).round().long().flip(0)


def sgm_timesteps(num_train: int, steps: int) -> torch.Tensor:
    """sgm's `LegacyDDPMDiscretization` (SDXL): linspace(T - 1, 0, steps, endpoint=False) cast to int, descending
    (999, 899, ..., 99 for 10 steps). Equal to "trailing" whenever `steps` divides T."""
    return (num_train - 1 - torch.arange(steps, dtype=torch.float64) * (num_train - 1) / steps).long()


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


# `timestep_spacing` choices (diffusers' names, and sgm's): a plan built with one visits these timesteps
# instead of its sampler's own.
SPACINGS = {"leading": leading_timesteps, "trailing": trailing_timesteps, "linspace": linspace_timesteps,
            "sgm": sgm_timesteps}
assert tuple(SPACINGS) == TIMESTEP_SPACINGS, "common.choices.TIMESTEP_SPACINGS names the spacings, in order"


def _timesteps(default, schedule: NoiseSchedule, steps: int, spacing: str | None) -> torch.Tensor:
    return (default if spacing is None else SPACINGS[spacing])(schedule.num_timesteps, steps)


# Plans: (schedule, steps, spacing) -> Plan, one per way of stepping; the registry in `ldm.samplers` names them.
def ddim_plan(schedule: NoiseSchedule, steps: int, spacing: str | None = None) -> Plan:
    """The original DDIMSampler's / PLMSSampler's steps. They end at alpha_bar[0], not 1, as the original does
    (and diffusers' `set_alpha_to_one=False`)."""
    timesteps = _timesteps(ddim_timesteps, schedule, steps, spacing)
    alphas_cumprod = schedule.alphas_cumprod.double()
    return Plan.from_alphas_cumprod(timesteps, torch.cat([alphas_cumprod[timesteps], alphas_cumprod[:1]]))


def ddpm_plan(schedule: NoiseSchedule, steps: int, spacing: str | None = None) -> Plan:
    """DDIM's timesteps, ending at alpha_bar = 1: DDPM's last step (Algorithm 2, t = 1) goes to the clean latent."""
    timesteps = _timesteps(ddim_timesteps, schedule, steps, spacing)
    alphas_cumprod = schedule.alphas_cumprod.double()
    return Plan.from_alphas_cumprod(timesteps, torch.cat([alphas_cumprod[timesteps], alphas_cumprod.new_ones(1)]))


def _at_schedule_sigmas(schedule: NoiseSchedule, timesteps: torch.Tensor) -> Plan:
    """The schedule's own noise levels at `timesteps`, then sigma 0."""
    sigmas = schedule.sigmas[timesteps]
    return Plan.from_sigmas(timesteps, torch.cat([sigmas, sigmas.new_zeros(1)]))


def leading_plan(schedule: NoiseSchedule, steps: int, spacing: str | None = None) -> Plan:
    """diffusers' Euler / Heun schedulers: "leading" timesteps (or `spacing`'s) at the schedule's sigmas, down to
    0. With "sgm" this is sgm's EulerEDMSampler on LegacyDDPMDiscretization (SDXL)."""
    return _at_schedule_sigmas(schedule, _timesteps(leading_timesteps, schedule, steps, spacing))


def dpm_solver_plan(schedule: NoiseSchedule, steps: int, spacing: str | None = None) -> Plan:
    """diffusers' DPMSolverMultistepScheduler: its "leading" timesteps (or `spacing`'s) at the schedule's sigmas,
    down to 0."""
    return _at_schedule_sigmas(schedule, _timesteps(dpm_solver_timesteps, schedule, steps, spacing))


def karras_plan(schedule: NoiseSchedule, steps: int, spacing: str | None = None) -> Plan:
    """Karras et al. 2022 (eq. 5) levels between the schedule's extremes, then 0; the model sees each
    level's rounded timestep (diffusers' `use_karras_sigmas=True`). The levels fix the timesteps, so a
    `spacing` does not apply."""
    all_sigmas = schedule.sigmas
    sigmas = karras_sigmas(all_sigmas[0].item(), all_sigmas[-1].item(), steps)
    timesteps = sigma_to_t(sigmas, schedule).round().long()
    return Plan.from_sigmas(timesteps, torch.cat([sigmas, sigmas.new_zeros(1)]))
