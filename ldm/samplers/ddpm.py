"""Ancestral sampling, DDPM Algorithm 2 (Ho et al. 2020), on the full chain or a respaced one."""
from __future__ import annotations

import torch

from ldm.samplers.denoiser import DiscreteDenoiser
from ldm.samplers.interface import Blend, Callback, Plan
from ldm.samplers.noise import Generators, randn_like

VARIANCES = ("posterior", "beta")


@torch.no_grad()
def sample_ddpm(denoiser: DiscreteDenoiser, x: torch.Tensor, plan: Plan, *, variance: str = "posterior",
                generator: Generators = None, callback: Callback = None, blend: Blend = None) -> torch.Tensor:
    """x_{t-1} ~ N(mu~(x_t, x0_pred), sigma_t^2 I), with sigma_t^2 the posterior variance beta~_t or beta_t.

    On a subsequence of timesteps the process is respaced (Nichol & Dhariwal 2021, app. B):
    beta'_t = 1 - a_t / a_prev between visited steps. The last step goes to the plan's last level
    (alpha_bar = 1 in `ddpm_plan`) with no noise.
    """
    if variance not in VARIANCES:
        raise ValueError(f"variance must be 'posterior' or 'beta', got {variance!r}")
    alphas, alphas_prev = plan.alphas_cumprod[:-1], plan.alphas_cumprod[1:]
    for i, t in enumerate(plan.timesteps):
        if blend is not None:  # inpainting: re-noise the known region to this step
            x = blend(x, i)
        a_t, a_prev = alphas[i].item(), alphas_prev[i].item()
        beta = 1 - a_t / a_prev
        x0, _ = denoiser.predict(x, t)
        # Posterior mean, DDPM eq. 7, with the respaced beta.
        mean = (a_prev ** 0.5 * beta / (1 - a_t)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
        if i < len(plan.timesteps) - 1:
            var = beta * (1 - a_prev) / (1 - a_t) if variance == "posterior" else beta
            x = mean + var ** 0.5 * randn_like(x, generator)
        else:
            x = mean
        if callback is not None:
            callback({"i": i, "t": int(t), "x": x, "x0": x0})
    return x
