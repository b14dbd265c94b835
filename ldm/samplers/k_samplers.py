"""Samplers of the probability-flow ODE / SDE in sigma space (Karras et al. 2022; k-diffusion).

The discrete VP model is used as a denoiser D(x, sigma) of the equivalent VE process
x = x_vp / sqrt(alpha_bar), sigma = sqrt((1 - alpha_bar) / alpha_bar) (`DiscreteDenoiser.__call__`).
Each sampler starts from the VP latent at the plan's first noise level and returns the clean latent
(sigma = 0, where both spaces agree). Only euler_a draws noise; the others ignore `generator`.
"""
from __future__ import annotations

import torch

from ldm.samplers.denoiser import DiscreteDenoiser
from ldm.samplers.interface import Blend, Callback, Plan
from ldm.samplers.noise import Generators, randn_like


def _start(x_vp: torch.Tensor, sigma: float) -> torch.Tensor:
    return x_vp * (sigma ** 2 + 1.0) ** 0.5


@torch.no_grad()
def sample_euler(denoiser: DiscreteDenoiser, x: torch.Tensor, plan: Plan, *,
                 generator: Generators = None, callback: Callback = None, blend: Blend = None) -> torch.Tensor:
    """Euler's method on dx/dsigma = (x - D(x, sigma)) / sigma  (Karras et al. 2022, eq. 3 / Algorithm 1)."""
    sigmas, timesteps = plan.sigmas, plan.timesteps
    x = _start(x, sigmas[0].item())
    for i, t in enumerate(timesteps):
        if blend is not None:  # inpainting: re-noise the known region to this step
            x = blend(x, i)
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0 = denoiser(x, sigma, t)
        x = x + (x - x0) / sigma * (sigma_next - sigma)
        if callback is not None:
            callback({"i": i, "t": int(t), "sigma": sigma, "x": x, "x0": x0})
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser: DiscreteDenoiser, x: torch.Tensor, plan: Plan, *, generator: Generators = None,
                           callback: Callback = None, blend: Blend = None) -> torch.Tensor:
    """Euler down to sigma_down, then fresh noise of std sigma_up (k-diffusion `sample_euler_ancestral`, eta 1)."""
    sigmas, timesteps = plan.sigmas, plan.timesteps
    x = _start(x, sigmas[0].item())
    for i, t in enumerate(timesteps):
        if blend is not None:  # inpainting: re-noise the known region to this step
            x = blend(x, i)
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0 = denoiser(x, sigma, t)
        sigma_up = min(sigma_next, (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
        x = x + (x - x0) / sigma * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + randn_like(x, generator) * sigma_up
        if callback is not None:
            callback({"i": i, "t": int(t), "sigma": sigma, "x": x, "x0": x0})
    return x


@torch.no_grad()
def sample_heun(denoiser: DiscreteDenoiser, x: torch.Tensor, plan: Plan, *,
                generator: Generators = None, callback: Callback = None, blend: Blend = None) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1); Euler for the final step to sigma 0."""
    sigmas, timesteps = plan.sigmas, plan.timesteps
    x = _start(x, sigmas[0].item())
    for i, t in enumerate(timesteps):
        if blend is not None:  # inpainting: re-noise the known region to this step
            x = blend(x, i)
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0 = denoiser(x, sigma, t)
        d = (x - x0) / sigma
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
        else:
            d_next = (x_euler - denoiser(x_euler, sigma_next, timesteps[i + 1])) / sigma_next
            x = x + (d + d_next) / 2 * (sigma_next - sigma)
        if callback is not None:
            callback({"i": i, "t": int(t), "sigma": sigma, "x": x, "x0": x0})
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser: DiscreteDenoiser, x: torch.Tensor, plan: Plan, *,
                    generator: Generators = None, callback: Callback = None, blend: Blend = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) with lambda = -log sigma.

    First order on the first step and on the final step to sigma 0, second order (multistep) between.
    """
    sigmas, timesteps = plan.sigmas, plan.timesteps
    x = _start(x, sigmas[0].item())
    old_x0 = None
    for i, t in enumerate(timesteps):
        if blend is not None:  # inpainting: re-noise the known region to this step
            x = blend(x, i)
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0 = denoiser(x, sigma, t)
        if sigma_next == 0:
            x = x0  # the limit of the update at lambda = +inf
        else:
            h = torch.tensor(sigma / sigma_next).log().item()  # lambda_next - lambda
            d = x0
            if old_x0 is not None:
                r = torch.tensor(sigmas[i - 1].item() / sigma).log().item() / h  # h_last / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
            x = (sigma_next / sigma) * x - torch.expm1(torch.tensor(-h)).item() * d
        old_x0 = x0
        if callback is not None:
            callback({"i": i, "t": int(t), "sigma": sigma, "x": x, "x0": x0})
    return x
