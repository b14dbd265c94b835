"""Samplers: pure functions that take the denoiser and own no weights.

`sample(model_fn, x_T, schedule, sampler=..., steps=...)` wraps `model_fn` in a `DiscreteDenoiser`
(which absorbs the parameterization), plans the timesteps the way the original code / diffusers
do for that sampler, handles the img2img start and the inpainting blend, and runs it. Every
sampler has one signature (`ldm.samplers.interface`); `SAMPLERS` says, per name, which function,
which plan, which state space and which of `sample`'s options it takes. `model_fn(x, t)` returns
the raw network output (eps, v or x0, per `parameterization`); wrap a conditional network with
`guided_model_fn` for classifier-free guidance.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from common.choices import SAMPLER_NAMES
from common.errors import InputError
from ldm.diffusion.parameterization import ModelFn
from ldm.diffusion.process import noise_to_level, noise_to_sigma
from ldm.diffusion.schedule import NoiseSchedule
from ldm.samplers.ddim import sample_ddim, sample_plms
from ldm.samplers.ddpm import VARIANCES, sample_ddpm
from ldm.samplers.denoiser import DiscreteDenoiser
from ldm.samplers.discretization import SPACINGS, ddim_plan, ddpm_plan, dpm_solver_plan, karras_plan, leading_plan
from ldm.samplers.guidance import guided_model_fn
from ldm.samplers.interface import Blend, Plan
from ldm.samplers.k_samplers import sample_dpmpp_2m, sample_euler, sample_euler_ancestral, sample_heun
from ldm.samplers.noise import Generators, randn_like


@dataclass(frozen=True)
class SamplerSpec:
    """One registry entry: the sampler, the steps it takes, its state space, and the options it reads.

    `function(denoiser, x, plan, *, generator, callback, blend, **options)`; `make_plan(schedule, steps, spacing)`;
    `sigma_space`: the state is x0 + sigma eps (Karras et al. 2022) rather than sqrt(a) x0 + sqrt(1-a) eps;
    `options`: the function's own keyword -> the `sample` argument that feeds it.
    """

    function: Callable[..., torch.Tensor]
    make_plan: Callable[[NoiseSchedule, int, str | None], Plan]
    sigma_space: bool = False
    options: dict[str, str] = field(default_factory=dict)


# name -> spec; the keys are the CLI's --sampler choices.
SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec(sample_ddim, ddim_plan, options={"eta": "eta"}),
    "plms": SamplerSpec(sample_plms, ddim_plan),
    "ddpm": SamplerSpec(sample_ddpm, ddpm_plan, options={"variance": "ddpm_variance"}),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, dpm_solver_plan, sigma_space=True),
    "dpmpp_2m_karras": SamplerSpec(sample_dpmpp_2m, karras_plan, sigma_space=True),
    "euler": SamplerSpec(sample_euler, leading_plan, sigma_space=True),
    "euler_a": SamplerSpec(sample_euler_ancestral, leading_plan, sigma_space=True),
    "heun": SamplerSpec(sample_heun, leading_plan, sigma_space=True),
}
assert tuple(SAMPLERS) == SAMPLER_NAMES, "common.choices.SAMPLER_NAMES names the samplers, in order"

__all__ = ["SAMPLERS", "SPACINGS", "DiscreteDenoiser", "Plan", "SamplerSpec", "guided_model_fn", "plan", "sample"]


def check_sampler_args(sampler: str, steps: int, num_timesteps: int, *, eta: float = 0.0,
                       strength: float = 1.0, spacing: str | None = None) -> None:
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    if spacing is not None and spacing not in SPACINGS:
        raise InputError(f"unknown timestep spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= num_timesteps:
        raise InputError(f"steps must be a whole number from 1 to {num_timesteps} (the training steps), got {steps!r}")
    if not 0.0 <= eta <= 1.0:
        raise InputError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    if not 0.0 < strength <= 1.0:
        raise InputError(f"strength must be in (0, 1] (1: start from pure noise), got {strength}")


def plan(sampler: str, schedule: NoiseSchedule, steps: int, spacing: str | None = None) -> Plan:
    """The steps `sampler` takes: (timesteps the model sees, descending; n + 1 noise levels as sigmas and as
    alpha_bar, the last where it ends). `plan(...)[0]` is the timesteps. `spacing` (see `SPACINGS`) replaces
    the sampler's own choice of timesteps."""
    return SAMPLERS[sampler].make_plan(schedule, steps, spacing)


def sample(model_fn: ModelFn, x_T: torch.Tensor, schedule: NoiseSchedule, *, sampler: str = "ddim",
           steps: int = 50, parameterization: str = "eps", eta: float = 0.0,
           generator: Generators = None, callback: Callable[[dict], None] | None = None,
           init_latent: torch.Tensor | None = None, strength: float = 1.0,
           keep_mask: torch.Tensor | None = None, ddpm_variance: str = "posterior",
           timestep_spacing: str | None = None, start_step: int = 0, end_step: int | None = None) -> torch.Tensor:
    """Run `sampler` from noise `x_T` (unit variance) and return the clean latent. Never modifies inputs.

    img2img (SDEdit, Meng et al. 2022): with `init_latent`, only the last int(strength * steps)
    steps run (at least one), starting from init_latent noised with `x_T` to the first of them.
    Inpainting (any model): with `keep_mask` (1 where `init_latent` is kept, broadcastable to it),
    before every step the kept region is replaced by init_latent re-noised to that step with fresh
    noise (the blend of the original LDM DDIMSampler's `mask` / `x0`), and the result keeps it exactly.
    `eta` is DDIM's; the ancestral samplers (ddpm, euler_a) always add their noise. `ddpm_variance`
    is DDPM's sigma_t^2: "posterior" (beta~_t) or "beta" (beta_t), DDPM sec. 3.2. `timestep_spacing`
    replaces the sampler's own timesteps (diffusers' leading / trailing / linspace, or sgm's).

    A hand-off between two models (SDXL base -> refiner) runs parts of one plan: `end_step` k stops
    after k steps and returns the (VP) latent at that noise level, not a clean one; `start_step` k takes
    `x_T` as that latent and runs the steps from k on.
    """
    check_sampler_args(sampler, steps, schedule.num_timesteps, eta=eta, strength=strength, spacing=timestep_spacing)
    denoiser = DiscreteDenoiser(model_fn, schedule, parameterization=parameterization)
    if ddpm_variance not in VARIANCES:
        raise InputError(f"ddpm_variance must be 'posterior' or 'beta', got {ddpm_variance!r}")
    spec = SAMPLERS[sampler]
    steps_plan = spec.make_plan(schedule, steps, timestep_spacing)
    n = len(steps_plan.timesteps)
    end_step = n if end_step is None else end_step
    if not 0 <= start_step < end_step <= n:
        raise InputError(f"start_step and end_step must satisfy 0 <= start < end <= {n} (the plan's steps), "
                         f"got {start_step} and {end_step}")
    if start_step and (init_latent is not None or keep_mask is not None):
        raise InputError("start_step continues a hand-off; it does not combine with init_latent / keep_mask")
    steps_plan = steps_plan.skip(start_step).until(end_step - start_step)
    x = x_T
    if init_latent is not None:
        if init_latent.shape != x_T.shape:
            raise InputError(f"init latent shape {tuple(init_latent.shape)} differs from the noise shape {tuple(x_T.shape)}")
        n = len(steps_plan.timesteps)
        steps_plan = steps_plan.skip(n - max(1, min(n, int(strength * n))))
        # q(x_t | x_0), DDPM eq. 4, with x_T as the noise.
        x = noise_to_level(init_latent, x_T, steps_plan.alphas_cumprod[0].item())
    blend = None
    if keep_mask is not None:
        if init_latent is None:
            raise InputError("a mask needs an init image (inpainting keeps part of it)")
        blend = _inpaint_blend(init_latent, keep_mask, steps_plan, spec.sigma_space, generator)
    arguments: dict[str, Any] = {"eta": eta, "ddpm_variance": ddpm_variance}
    options = {keyword: arguments[argument] for keyword, argument in spec.options.items()}
    x = spec.function(denoiser, x, steps_plan, generator=generator, callback=callback, blend=blend, **options)
    if end_step < n and spec.sigma_space:  # back from x0 + sigma eps to the VP latent the next part starts from
        x = x / (steps_plan.sigmas[-1].item() ** 2 + 1.0) ** 0.5
    if keep_mask is not None:
        x = keep_mask * init_latent + (1 - keep_mask) * x
    return x


def _inpaint_blend(init_latent: torch.Tensor, keep_mask: torch.Tensor, steps_plan: Plan, sigma_space: bool,
                   generator: Generators) -> Blend:
    """x -> keep * q(x_t | init) + (1 - keep) * x at step i, in the sampler's own space (VP or sigma)."""

    def blend(x: torch.Tensor, i: int) -> torch.Tensor:
        noise = randn_like(x, generator)
        if sigma_space:
            known = noise_to_sigma(init_latent, noise, steps_plan.sigmas[i].item())
        else:
            known = noise_to_level(init_latent, noise, steps_plan.alphas_cumprod[i].item())
        return keep_mask * known + (1 - keep_mask) * x

    return blend
