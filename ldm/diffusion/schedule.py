"""Noise schedules: betas, and every table the diffusion process derives from them.

Tables are computed in float64 and stored in float32, as the original `register_schedule` does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from common.errors import InputError

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")


def make_betas(schedule: str, timesteps: int, linear_start: float = 0.00085, linear_end: float = 0.012,
               *, cosine_s: float = 8e-3) -> torch.Tensor:
    """beta_1..beta_T in float64.

    - `scaled_linear`: linear in sqrt(beta), what the original LDM code calls "linear"
      (SD: 0.00085 .. 0.012 over 1000 steps).
    - `linear`: DDPM's schedule, linear in beta (Ho et al. 2020, sec. 4).
    - `cosine`: alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2) (Nichol & Dhariwal 2021, eq. 17),
      betas clipped at 0.999.
    """
    if timesteps < 1:
        raise InputError(f"timesteps must be >= 1, got {timesteps}")
    if schedule == "scaled_linear":
        return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    if schedule == "linear":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    if schedule == "cosine":
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + cosine_s
        alphas_bar = torch.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        alphas_bar = alphas_bar / alphas_bar[0]
        return (1 - alphas_bar[1:] / alphas_bar[:-1]).clamp(0, 0.999)
    raise InputError(f"unknown beta schedule {schedule!r}; valid: {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so the last step has SNR 0 (Lin et al. 2023, Algorithm 1).

    The final alpha_bar is exactly 0: pure noise. Use with v-prediction (an eps model cannot
    recover x0 from pure noise).
    """
    sqrt_alphas_bar = torch.cumprod(1 - betas.double(), dim=0).sqrt()
    first, last = sqrt_alphas_bar[0].clone(), sqrt_alphas_bar[-1].clone()
    sqrt_alphas_bar = (sqrt_alphas_bar - last) * first / (first - last)
    alphas_bar = sqrt_alphas_bar ** 2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


@dataclass(frozen=True)
class NoiseSchedule:
    """The discrete forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I), t = 0..T-1.

    Every table is float32 [T], derived in float64 (names as in the original `register_schedule`).
    """

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> "NoiseSchedule":
        betas = betas.double()
        alphas = 1 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t I)  (DDPM eqs. 6-7).
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        tables = dict(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1 - alphas_cumprod).sqrt(),
            posterior_variance=posterior_variance,
            # The first posterior variance is 0: clip before the log, as the original does.
            posterior_log_variance_clipped=posterior_variance.clamp(min=1e-20).log(),
            posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            posterior_mean_coef2=(1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod),
        )
        return cls(**{k: v.float() for k, v in tables.items()})

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor) -> "NoiseSchedule":
        """Rebuild every table from alpha_bar (e.g. the `alphas_cumprod` buffer of a checkpoint)."""
        ac = alphas_cumprod.detach().double().cpu()
        betas = 1 - torch.cat([ac[:1], ac[1:] / ac[:-1]])
        return cls.from_betas(betas)

    @classmethod
    def make(cls, schedule: str = "scaled_linear", timesteps: int = 1000, linear_start: float = 0.00085,
             linear_end: float = 0.012, *, zero_terminal_snr: bool = False) -> "NoiseSchedule":
        betas = make_betas(schedule, timesteps, linear_start, linear_end)
        return cls.from_betas(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def sigmas(self) -> torch.Tensor:
        """Noise levels of the equivalent variance-exploding process, sqrt((1 - a_t) / a_t), float64.

        alpha_bar is floored at 2**-24 (as diffusers does), so a zero-terminal-SNR schedule ends at
        sigma ~ 4096 instead of infinity.
        """
        ac = self.alphas_cumprod.double().clamp(min=2.0 ** -24)
        return ((1 - ac) / ac).sqrt()
