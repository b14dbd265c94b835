"""The denoiser adapter: a network of the discrete VP process, whatever it predicts, as one denoiser.

As k-diffusion's `DiscreteEpsDDPMDenoiser` / `DiscreteVDDPMDenoiser` (external.py), this is the one
place that knows the parameterization (eps, v or x0; Salimans & Ho 2022, sec. 4), so no sampler
branches on it. `predict` serves the VP samplers (DDIM, PLMS, DDPM); calling it as D(x, sigma, t)
serves the sigma-space ones (Karras et al. 2022).
"""
from __future__ import annotations

import torch

from ldm.diffusion.parameterization import ModelFn, check_parameterization, predict_eps, predict_x0
from ldm.diffusion.schedule import NoiseSchedule


class DiscreteDenoiser:
    """`model_fn(x_t, t)` (raw output per `parameterization`) seen as predictions of x0 and eps.

    Timesteps `t` are 0-dim tensors on the CPU (a `Plan`'s) or ints; they are sent to the device
    with the latent, so the adapter never reads a device tensor.
    """

    def __init__(self, model_fn: ModelFn, schedule: NoiseSchedule, *, parameterization: str):
        check_parameterization(parameterization)
        self.model_fn, self.parameterization = model_fn, parameterization
        self.alphas_cumprod = schedule.alphas_cumprod.double()  # alpha_bar_t, read in float64 as the samplers do

    def _output(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model_fn(x, t.expand(x.shape[0]).to(x.device))

    def predict(self, x_t: torch.Tensor, t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) for the VP state x_t = sqrt(a) x0 + sqrt(1 - a) eps at timestep t, a = alpha_bar_t (DDPM eq. 4)."""
        t = torch.as_tensor(t)
        alpha_bar = self.alphas_cumprod[t].to(x_t.dtype)
        output = self._output(x_t, t)
        return (predict_x0(x_t, output, alpha_bar, self.parameterization),
                predict_eps(x_t, output, alpha_bar, self.parameterization))

    def __call__(self, x: torch.Tensor, sigma: float, t: torch.Tensor | int) -> torch.Tensor:
        """D(x; sigma): x0 for the VE state x = x0 + sigma eps, the network run at timestep t.

        The network sees the VP state x / sqrt(sigma^2 + 1) (Karras et al. 2022, table 1, c_in for
        the VP model); sigma is explicit because Karras levels fall between the schedule's.
        """
        alpha_bar = torch.tensor(1.0 / (sigma ** 2 + 1.0), dtype=x.dtype, device=x.device)
        x_vp = x * alpha_bar.sqrt()
        return predict_x0(x_vp, self._output(x_vp, torch.as_tensor(t)), alpha_bar, self.parameterization)
