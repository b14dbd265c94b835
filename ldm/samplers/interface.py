"""The one signature every sampler has, and the types in it.

    sample_x(denoiser, x, plan, *, generator=None, callback=None, blend=None, **its own options) -> x0

`denoiser` is a `DiscreteDenoiser` (the network whatever it predicts), `x` the latent at the plan's
first noise level (VP: sqrt(a) x0 + sqrt(1-a) eps), `plan` the steps to take. Samplers are pure:
they own no weights, never modify their inputs, and return the clean latent (k-diffusion's
`sample_x(model, x, sigmas, ...)`, with the timesteps carried next to the noise levels).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

Callback = Callable[[dict], None] | None  # called after every step with {"i", "t", "x", "x0", ...}
Blend = Callable[[torch.Tensor, int], torch.Tensor] | None  # (x, step index) -> x, before the model call


class Plan(NamedTuple):
    """The steps a sampler takes: at step i the model sees `timesteps[i]` at noise level i; it ends at level n.

    The n + 1 levels come in both views of the same state, float64 on the CPU: `sigmas` of the
    variance-exploding process (x = x0 + sigma eps) and `alphas_cumprod`, alpha_bar = 1 / (sigma^2 + 1),
    of the variance-preserving one. Karras sigmas are not the schedule's sigmas at their (rounded)
    timesteps, so the levels are kept beside the timesteps rather than looked up from them. A tuple,
    so `plan(...)[0]` is the timesteps.
    """

    timesteps: torch.Tensor  # (n,) long, descending
    sigmas: torch.Tensor  # (n + 1,) float64
    alphas_cumprod: torch.Tensor  # (n + 1,) float64

    @classmethod
    def from_alphas_cumprod(cls, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> Plan:
        """Levels given as alpha_bar; sigma = sqrt((1 - a) / a) with a floored at 2**-24, as `NoiseSchedule.sigmas`."""
        _check_lengths(timesteps, alphas_cumprod)
        alphas_cumprod = alphas_cumprod.double()
        floored = alphas_cumprod.clamp(min=2.0 ** -24)
        return cls(timesteps, ((1 - floored) / floored).sqrt(), alphas_cumprod)

    @classmethod
    def from_sigmas(cls, timesteps: torch.Tensor, sigmas: torch.Tensor) -> Plan:
        """Levels given as VE noise levels; alpha_bar = 1 / (sigma^2 + 1)."""
        _check_lengths(timesteps, sigmas)
        sigmas = sigmas.double()
        return cls(timesteps, sigmas, 1.0 / (sigmas ** 2 + 1.0))

    def skip(self, start: int) -> Plan:
        """The plan from step `start` on (img2img runs only the last steps)."""
        return Plan(self.timesteps[start:], self.sigmas[start:], self.alphas_cumprod[start:])

    def until(self, steps: int) -> Plan:
        """The first `steps` steps, ending at noise level `steps` (a hand-off to another model there)."""
        return Plan(self.timesteps[:steps], self.sigmas[:steps + 1], self.alphas_cumprod[:steps + 1])


def _check_lengths(timesteps: torch.Tensor, levels: torch.Tensor) -> None:
    if levels.shape != (len(timesteps) + 1,):
        raise ValueError(f"a plan of {len(timesteps)} timesteps needs {len(timesteps) + 1} noise levels "
                         f"(the last one where it ends), got shape {tuple(levels.shape)}")
