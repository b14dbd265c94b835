"""DDIM (Song et al. 2020) and PLMS (Liu et al. 2022), as the original SD DDIMSampler / PLMSSampler."""
from __future__ import annotations

from typing import Callable

import torch

from ldm.diffusion.parameterization import ModelFn, predict_eps, predict_x0
from ldm.diffusion.schedule import NoiseSchedule
from ldm.samplers.noise import Generators, randn_like

Callback = Callable[[dict], None] | None
Blend = Callable[[torch.Tensor, int], torch.Tensor] | None  # (x, step index) -> x, before the model call


def _alphas(schedule: NoiseSchedule, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_bar at each visited t and at the next one; the last "next" is alpha_bar[0], not 1 (as the original)."""
    ac = schedule.alphas_cumprod.double()
    alphas = ac[timesteps]
    alphas_prev = torch.cat([ac[timesteps[1:]], ac[:1]])
    return alphas, alphas_prev


def ddim_sigmas(alphas: torch.Tensor, alphas_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """sigma_t(eta) = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)  (DDIM eq. 16)."""
    return eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()


def _ddim_step(x: torch.Tensor, eps: torch.Tensor, x0: torch.Tensor, a_prev: float, sigma: float,
               generator: Generators) -> torch.Tensor:
    """x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z  (DDIM eq. 12)."""
    x_prev = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
    if sigma > 0:
        x_prev = x_prev + sigma * randn_like(x, generator)
    return x_prev


@torch.no_grad()
def sample_ddim(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, timesteps: torch.Tensor, *,
                parameterization: str, eta: float = 0.0, generator: Generators = None,
                callback: Callback = None, blend: Blend = None) -> torch.Tensor:
    """DDIM from x at timesteps[0] down to x_0; eta=0 is deterministic, eta=1 the DDPM posterior."""
    alphas, alphas_prev = _alphas(schedule, timesteps)
    sigmas = ddim_sigmas(alphas, alphas_prev, eta)
    for i, t in enumerate(timesteps):
        if blend is not None:  # inpainting: re-noise the known region to this step
            x = blend(x, i)
        a_t = alphas[i].to(x.dtype)
        output = model_fn(x, t.expand(x.shape[0]).to(x.device))
        eps, x0 = predict_eps(x, output, a_t, parameterization), predict_x0(x, output, a_t, parameterization)
        x = _ddim_step(x, eps, x0, alphas_prev[i].item(), sigmas[i].item(), generator)
        if callback is not None:
            callback({"i": i, "t": int(t), "x": x, "x0": x0})
    return x


@torch.no_grad()
def sample_plms(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, timesteps: torch.Tensor, *,
                parameterization: str, generator: Generators = None,
                callback: Callback = None, blend: Blend = None) -> torch.Tensor:
    """Pseudo linear multistep (PNDM, Liu et al. 2022, eqs. 12-13) on the DDIM step, as SD's PLMSSampler.

    The first step is a pseudo improved Euler (two model calls); later ones use Adams-Bashforth
    combinations of up to four past eps.
    """
    alphas, alphas_prev = _alphas(schedule, timesteps)
    old_eps: list[torch.Tensor] = []

    def eps_of(x_in: torch.Tensor, t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return predict_eps(x_in, model_fn(x_in, t.expand(x_in.shape[0]).to(x_in.device)), a, parameterization)

    def step(x_in: torch.Tensor, eps: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a_t = alphas[i].to(x_in.dtype)
        x0 = (x_in - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        return _ddim_step(x_in, eps, x0, alphas_prev[i].item(), 0.0, None), x0

    for i, t in enumerate(timesteps):
        if blend is not None:  # inpainting: re-noise the known region to this step
            x = blend(x, i)
        eps = eps_of(x, t, alphas[i].to(x.dtype))
        if not old_eps:
            x_next, _ = step(x, eps, i)
            t_next = timesteps[min(i + 1, len(timesteps) - 1)]
            a_next = alphas[min(i + 1, len(timesteps) - 1)].to(x.dtype)
            eps_prime = (eps + eps_of(x_next, t_next, a_next)) / 2
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x, x0 = step(x, eps_prime, i)
        old_eps = (old_eps + [eps])[-3:]
        if callback is not None:
            callback({"i": i, "t": int(t), "x": x, "x0": x0})
    return x
