"""The DDPM training objective on latents, with min-SNR-gamma weighting and offset noise."""
from __future__ import annotations

import torch

from common.errors import InputError
from ldm.diffusion.parameterization import ModelFn, check_parameterization, model_target
from ldm.diffusion.process import extract, q_sample
from ldm.diffusion.schedule import NoiseSchedule


def min_snr_weight(alpha_bar: torch.Tensor, gamma: float, parameterization: str) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, eq. 9 and sec. 3.4), per parameterization.

    With SNR = a / (1 - a): eps-loss weight min(SNR, g) / SNR, v-loss min(SNR, g) / (SNR + 1),
    x0-loss min(SNR, g).
    """
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    # the eps weight's limit at SNR 0 (a zero-terminal-SNR schedule's last step) is 1, not 0 / 0
    eps_weight = torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    return {"eps": eps_weight, "v": clipped / (snr + 1), "x0": clipped}[parameterization]


def diffusion_loss(model_fn: ModelFn, x0: torch.Tensor, schedule: NoiseSchedule, *, parameterization: str,
                   loss_type: str = "l2", min_snr_gamma: float | None = None, offset_noise: float = 0.0,
                   t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample training losses and the timesteps drawn (DDPM Algorithm 1, "simple" loss).

    t ~ U{0..T-1}, eps ~ N(0, I) (+ `offset_noise` * a per-channel constant, Guttenberg 2023),
    x_t by eq. 4, and the MSE (or L1) between the model output and its target, averaged over all
    but the batch dimension; optional min-SNR-gamma weights. Callers can bucket the losses by t.
    """
    check_parameterization(parameterization)
    if loss_type not in ("l2", "l1"):
        raise InputError(f"loss_type {loss_type!r} is not one of l2, l1")
    batch = x0.shape[0]
    if t is None:
        t = torch.randint(0, schedule.num_timesteps, (batch,), generator=generator, device="cpu").to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device="cpu", dtype=x0.dtype).to(x0.device)
        if offset_noise:
            offset = torch.randn((*x0.shape[:2], *([1] * (x0.ndim - 2))), generator=generator, device="cpu")
            noise = noise + offset_noise * offset.to(x0.device, x0.dtype)
    x_t = q_sample(schedule, x0, t, noise)
    alpha_bar = extract(schedule.alphas_cumprod, t, x0)
    target = model_target(x0, noise, alpha_bar, parameterization)
    output = model_fn(x_t, t)
    error = (output.float() - target.float())
    error = error.pow(2) if loss_type == "l2" else error.abs()
    loss = error.mean(dim=tuple(range(1, x0.ndim)))
    if min_snr_gamma is not None:
        loss = loss * min_snr_weight(alpha_bar.float().flatten(), min_snr_gamma, parameterization)
    return loss, t
