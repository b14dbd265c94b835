"""Samplers of the probability-flow ODE / SDE in sigma space (Karras et al. 2022; k-diffusion).

The discrete VP model is used as a denoiser D(x, sigma) of the equivalent VE process
x = x_vp / sqrt(alpha_bar), sigma = sqrt((1 - alpha_bar) / alpha_bar): the network sees
x / sqrt(sigma^2 + 1) at the timestep of sigma. Each sampler starts from the VP latent at the first
noise level and returns the clean latent (sigma = 0, where both spaces agree).
"""
from __future__ import annotations

import torch

from ldm.diffusion.parameterization import ModelFn, predict_x0
from ldm.samplers.ddim import Blend, Callback
from ldm.samplers.noise import Generators, randn_like


class _Denoiser:
    """D(x, sigma, t): the model's x0 prediction for the VE state x at noise level sigma, timestep t."""

    def __init__(self, model_fn: ModelFn, parameterization: str):
        self.model_fn, self.parameterization = model_fn, parameterization

    def __call__(self, x: torch.Tensor, sigma: float, t: torch.Tensor) -> torch.Tensor:
        alpha_bar = torch.tensor(1.0 / (sigma ** 2 + 1.0), dtype=x.dtype, device=x.device)
        x_vp = x * alpha_bar.sqrt()
        output = self.model_fn(x_vp, t.expand(x.shape[0]).to(x.device))
        return predict_x0(x_vp, output, alpha_bar, self.parameterization)


def _start(x_vp: torch.Tensor, sigma: float) -> torch.Tensor:
    return x_vp * (sigma ** 2 + 1.0) ** 0.5


@torch.no_grad()
def sample_euler(model_fn: ModelFn, x: torch.Tensor, sigmas: torch.Tensor, timesteps: torch.Tensor, *,
                 parameterization: str, callback: Callback = None, blend: Blend = None, **_) -> torch.Tensor:
    """Euler's method on dx/dsigma = (x - D(x, sigma)) / sigma  (Karras et al. 2022, eq. 3 / Algorithm 1)."""
    denoise = _Denoiser(model_fn, parameterization)
    x = _start(x, sigmas[0].item())
    for i, t in enumerate(timesteps):
        if blend is not None:  # inpainting: re-noise the known region to this step
            x = blend(x, i)
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0 = denoise(x, sigma, t)
        x = x + (x - x0) / sigma * (sigma_next - sigma)
        if callback is not None:
            callback({"i": i, "t": int(t), "sigma": sigma, "x": x, "x0": x0})
    return x


@torch.no_grad()
def sample_euler_ancestral(model_fn: ModelFn, x: torch.Tensor, sigmas: torch.Tensor, timesteps: torch.Tensor, *,
                           parameterization: str, generator: Generators = None,
                           callback: Callback = None, blend: Blend = None, **_) -> torch.Tensor:
    """Euler down to sigma_down, then fresh noise of std sigma_up (k-diffusion `sample_euler_ancestral`, eta 1)."""
    denoise = _Denoiser(model_fn, parameterization)
    x = _start(x, sigmas[0].item())
    for i, t in enumerate(timesteps):
        if blend is not None:  # inpainting: re-noise the known region to this step
            x = blend(x, i)
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0 = denoise(x, sigma, t)
        sigma_up = min(sigma_next, (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
        x = x + (x - x0) / sigma * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + randn_like(x, generator) * sigma_up
        if callback is not None:
            callback({"i": i, "t": int(t), "sigma": sigma, "x": x, "x0": x0})
    return x


@torch.no_grad()
def sample_heun(model_fn: ModelFn, x: torch.Tensor, sigmas: torch.Tensor, timesteps: torch.Tensor, *,
                parameterization: str, callback: Callback = None, blend: Blend = None, **_) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1); Euler for the final step to sigma 0."""
    denoise = _Denoiser(model_fn, parameterization)
    x = _start(x, sigmas[0].item())
    for i, t in enumerate(timesteps):
        if blend is not None:  # inpainting: re-noise the known region to this step
            x = blend(x, i)
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0 = denoise(x, sigma, t)
        d = (x - x0) / sigma
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
        else:
            d_next = (x_euler - denoise(x_euler, sigma_next, timesteps[i + 1])) / sigma_next
            x = x + (d + d_next) / 2 * (sigma_next - sigma)
        if callback is not None:
            callback({"i": i, "t": int(t), "sigma": sigma, "x": x, "x0": x0})
    return x


@torch.no_grad()
def sample_dpmpp_2m(model_fn: ModelFn, x: torch.Tensor, sigmas: torch.Tensor, timesteps: torch.Tensor, *,
                    parameterization: str, callback: Callback = None, blend: Blend = None, **_) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) with lambda = -log sigma.

    First order on the first step and on the final step to sigma 0, second order (multistep) between.
    """
    denoise = _Denoiser(model_fn, parameterization)
    x = _start(x, sigmas[0].item())
    old_x0 = None
    for i, t in enumerate(timesteps):
        if blend is not None:  # inpainting: re-noise the known region to this step
            x = blend(x, i)
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0 = denoise(x, sigma, t)
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
