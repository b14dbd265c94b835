"""Samplers: pure functions that take the model function and own no weights.

`sample(model_fn, x_T, schedule, sampler=..., steps=...)` picks the timesteps the way the original
code / diffusers do for that sampler, handles the img2img start, and runs it. `model_fn(x, t)`
returns the raw network output (eps, v or x0, per `parameterization`); wrap a conditional
denoiser with `guided_model_fn` for classifier-free guidance.
"""
from __future__ import annotations

from typing import Callable

import torch

from common.errors import InputError

from ldm.diffusion.parameterization import ModelFn, check_parameterization
from ldm.diffusion.schedule import NoiseSchedule
from ldm.samplers.ddim import sample_ddim, sample_plms
from ldm.samplers.ddpm import sample_ddpm
from ldm.samplers.discretization import ddim_timesteps, dpm_solver_timesteps, karras_sigmas, leading_timesteps, sigma_to_t
from ldm.samplers.guidance import guided_model_fn
from ldm.samplers.noise import Generators, randn_like
from ldm.samplers.k_samplers import sample_dpmpp_2m, sample_euler, sample_euler_ancestral, sample_heun

# name -> (function, works in sigma space)
SAMPLERS: dict[str, tuple[Callable, bool]] = {
    "ddim": (sample_ddim, False),
    "plms": (sample_plms, False),
    "ddpm": (sample_ddpm, False),
    "dpmpp_2m": (sample_dpmpp_2m, True),
    "dpmpp_2m_karras": (sample_dpmpp_2m, True),
    "euler": (sample_euler, True),
    "euler_a": (sample_euler_ancestral, True),
    "heun": (sample_heun, True),
}

__all__ = ["SAMPLERS", "guided_model_fn", "plan", "sample"]


def check_sampler_args(sampler: str, steps: int, num_timesteps: int, *, eta: float = 0.0,
                       strength: float = 1.0) -> None:
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= num_timesteps:
        raise InputError(f"steps must be a whole number from 1 to {num_timesteps} (the training steps), got {steps!r}")
    if not 0.0 <= eta <= 1.0:
        raise InputError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    if not 0.0 < strength <= 1.0:
        raise InputError(f"strength must be in (0, 1] (1: start from pure noise), got {strength}")


def plan(sampler: str, schedule: NoiseSchedule, steps: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(timesteps the model sees, descending; noise levels for sigma-space samplers, ending in 0)."""
    T = schedule.num_timesteps
    if not SAMPLERS[sampler][1]:
        return ddim_timesteps(T, steps), None
    all_sigmas = schedule.sigmas
    if sampler == "dpmpp_2m_karras":
        sigmas = karras_sigmas(all_sigmas[0].item(), all_sigmas[-1].item(), steps)
        timesteps = sigma_to_t(sigmas, schedule).round().long()
    else:
        timesteps = dpm_solver_timesteps(T, steps) if sampler == "dpmpp_2m" else leading_timesteps(T, steps)
        sigmas = all_sigmas[timesteps]
    return timesteps, torch.cat([sigmas, sigmas.new_zeros(1)])


def sample(model_fn: ModelFn, x_T: torch.Tensor, schedule: NoiseSchedule, *, sampler: str = "ddim",
           steps: int = 50, parameterization: str = "eps", eta: float = 0.0,
           generator: Generators = None, callback: Callable[[dict], None] | None = None,
           init_latent: torch.Tensor | None = None, strength: float = 1.0,
           keep_mask: torch.Tensor | None = None, ddpm_variance: str = "posterior") -> torch.Tensor:
    """Run `sampler` from noise `x_T` (unit variance) and return the clean latent. Never modifies inputs.

    img2img (SDEdit, Meng et al. 2022): with `init_latent`, only the last int(strength * steps)
    steps run (at least one), starting from init_latent noised with `x_T` to the first of them.
    Inpainting (any model): with `keep_mask` (1 where `init_latent` is kept, broadcastable to it),
    before every step the kept region is replaced by init_latent re-noised to that step with fresh
    noise (the blend of the original LDM DDIMSampler's `mask` / `x0`), and the result keeps it exactly.
    `eta` is DDIM's; the ancestral samplers (ddpm, euler_a) always add their noise. `ddpm_variance`
    is DDPM's sigma_t^2: "posterior" (beta~_t) or "beta" (beta_t), DDPM sec. 3.2.
    """
    check_sampler_args(sampler, steps, schedule.num_timesteps, eta=eta, strength=strength)
    check_parameterization(parameterization)
    if ddpm_variance not in ("posterior", "beta"):
        raise InputError(f"ddpm_variance must be 'posterior' or 'beta', got {ddpm_variance!r}")
    timesteps, sigmas = plan(sampler, schedule, steps)
    x = x_T
    if init_latent is not None:
        if init_latent.shape != x_T.shape:
            raise InputError(f"init latent shape {tuple(init_latent.shape)} differs from the noise shape {tuple(x_T.shape)}")
        n = len(timesteps)
        start = n - max(1, min(n, int(strength * n)))
        timesteps = timesteps[start:]
        if sigmas is not None:
            sigmas = sigmas[start:]
            alpha_bar = 1.0 / (sigmas[0].item() ** 2 + 1.0)
        else:
            alpha_bar = schedule.alphas_cumprod[timesteps[0]].item()
        # q(x_t | x_0), DDPM eq. 4, with x_T as the noise.
        x = alpha_bar ** 0.5 * init_latent + (1 - alpha_bar) ** 0.5 * x_T
    function, sigma_space = SAMPLERS[sampler]
    kwargs = dict(parameterization=parameterization, callback=callback)
    if keep_mask is not None:
        if init_latent is None:
            raise InputError("a mask needs an init image (inpainting keeps part of it)")
        kwargs["blend"] = _inpaint_blend(init_latent, keep_mask, schedule, timesteps, sigmas, generator)
    if sampler in ("ddim",):
        kwargs["eta"] = eta
    if sampler == "ddpm":
        kwargs["variance"] = ddpm_variance
    if sampler in ("ddim", "ddpm", "plms", "euler_a"):
        kwargs["generator"] = generator
    if sigma_space:
        x = function(model_fn, x, sigmas, timesteps, **kwargs)
    else:
        x = function(model_fn, x, schedule, timesteps, **kwargs)
    if keep_mask is not None:
        x = keep_mask * init_latent + (1 - keep_mask) * x
    return x


def _inpaint_blend(init_latent: torch.Tensor, keep_mask: torch.Tensor, schedule: NoiseSchedule,
                   timesteps: torch.Tensor, sigmas: torch.Tensor | None, generator: Generators):
    """x -> keep * q(x_t | init) + (1 - keep) * x at step i, in the sampler's own space (VP or sigma)."""
    alphas = schedule.alphas_cumprod.double()

    def blend(x: torch.Tensor, i: int) -> torch.Tensor:
        noise = randn_like(x, generator)
        if sigmas is not None:  # variance-exploding state: x = x0 + sigma * eps
            known = init_latent + sigmas[i].item() * noise
        else:  # DDPM eq. 4
            a = alphas[timesteps[i]].item()
            known = a ** 0.5 * init_latent + (1 - a) ** 0.5 * noise
        return keep_mask * known + (1 - keep_mask) * x

    return blend
