"""Ancestral sampling, DDPM Algorithm 2 (Ho et al. 2020), on the full chain or a respaced one."""
from __future__ import annotations

import torch

from ldm.diffusion.parameterization import ModelFn, predict_x0
from ldm.diffusion.schedule import NoiseSchedule
from ldm.samplers.ddim import Blend, Callback
from ldm.samplers.noise import Generators, randn_like


@torch.no_grad()
def sample_ddpm(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, timesteps: torch.Tensor, *,
                parameterization: str, variance: str = "posterior", generator: Generators = None,
                callback: Callback = None, blend: Blend = None) -> torch.Tensor:
    """x_{t-1} ~ N(mu~(x_t, x0_pred), sigma_t^2 I), with sigma_t^2 the posterior variance beta~_t or beta_t.

    On a subsequence of timesteps the process is respaced (Nichol & Dhariwal 2021, app. B):
    beta'_t = 1 - a_t / a_prev between visited steps. The last step goes to alpha_bar = 1 with no noise.
    """
    if variance not in ("posterior", "beta"):
        raise ValueError(f"variance must be 'posterior' or 'beta', got {variance!r}")
    ac = schedule.alphas_cumprod.double()
    alphas = ac[timesteps]
    alphas_prev = torch.cat([ac[timesteps[1:]], ac.new_ones(1)])
    for i, t in enumerate(timesteps):
        if blend is not None:  # inpainting: re-noise the known region to this step
            x = blend(x, i)
        a_t, a_prev = alphas[i].item(), alphas_prev[i].item()
        beta = 1 - a_t / a_prev
        output = model_fn(x, t.expand(x.shape[0]).to(x.device))
        x0 = predict_x0(x, output, alphas[i].to(x.dtype), parameterization)
        # Posterior mean, DDPM eq. 7, with the respaced beta.
        mean = (a_prev ** 0.5 * beta / (1 - a_t)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
        if i < len(timesteps) - 1:
            var = beta * (1 - a_prev) / (1 - a_t) if variance == "posterior" else beta
            x = mean + var ** 0.5 * randn_like(x, generator)
        else:
            x = mean
        if callback is not None:
            callback({"i": i, "t": int(t), "x": x, "x0": x0})
    return x
