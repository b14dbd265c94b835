"""DDIM (Song et al. 2020) and PLMS (Liu et al. 2022), as the original SD DDIMSampler / PLMSSampler."""
from __future__ import annotations

import torch

from ldm.diffusion.parameterization import x0_from_eps
from ldm.samplers.denoiser import DiscreteDenoiser
from ldm.samplers.interface import Blend, Callback, Plan
from ldm.samplers.noise import Generators, randn_like


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
def sample_ddim(denoiser: DiscreteDenoiser, x: torch.Tensor, plan: Plan, *, eta: float = 0.0,
                generator: Generators = None, callback: Callback = None, blend: Blend = None) -> torch.Tensor:
    """DDIM from x at the plan's first level down to its last; eta=0 is deterministic, eta=1 the DDPM posterior."""
    alphas, alphas_prev = plan.alphas_cumprod[:-1], plan.alphas_cumprod[1:]
    stds = ddim_sigmas(alphas, alphas_prev, eta)  # DDIM's sigma_t, the std of the added noise
    for i, t in enumerate(plan.timesteps):
        if blend is not None:  # inpainting: re-noise the known region to this step
            x = blend(x, i)
        x0, eps = denoiser.predict(x, t)
        x = _ddim_step(x, eps, x0, alphas_prev[i].item(), stds[i].item(), generator)
        if callback is not None:
            callback({"i": i, "t": int(t), "x": x, "x0": x0})
    return x


@torch.no_grad()
def sample_plms(denoiser: DiscreteDenoiser, x: torch.Tensor, plan: Plan, *, generator: Generators = None,
                callback: Callback = None, blend: Blend = None) -> torch.Tensor:
    """Pseudo linear multistep (PNDM, Liu et al. 2022, eqs. 12-13) on the DDIM step, as SD's PLMSSampler.

    The first step is a pseudo improved Euler (two model calls); later ones use Adams-Bashforth
    combinations of up to four past eps. A step at SNR 0 is a DDIM step (below). Deterministic: `generator` is
    not used.
    """
    timesteps = plan.timesteps
    alphas, alphas_prev = plan.alphas_cumprod[:-1], plan.alphas_cumprod[1:]
    old_eps: list[torch.Tensor] = []

    def step(x_in: torch.Tensor, eps: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = x0_from_eps(x_in, eps, alphas[i].to(x_in.dtype))
        return _ddim_step(x_in, eps, x0, alphas_prev[i].item(), 0.0, None), x0

    for i, t in enumerate(timesteps):
        if blend is not None:  # inpainting: re-noise the known region to this step
            x = blend(x, i)
        x0, eps = denoiser.predict(x, t)
        if alphas[i] == 0:
            # SNR 0 (a zero-terminal-SNR schedule's first step, Lin et al. 2023): eps is x itself and says nothing
            # of x0, so the eps-only step below would divide by sqrt(a) = 0. One DDIM step with the model's x0
            # instead; the multistep history starts after it (the original sampler has no such schedule).
            x = _ddim_step(x, eps, x0, alphas_prev[i].item(), 0.0, None)
            if callback is not None:
                callback({"i": i, "t": int(t), "x": x, "x0": x0})
            continue
        if not old_eps:
            x_next, _ = step(x, eps, i)
            _, eps_next = denoiser.predict(x_next, timesteps[min(i + 1, len(timesteps) - 1)])
            eps_prime = (eps + eps_next) / 2
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
