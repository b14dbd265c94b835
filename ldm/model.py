"""LatentDiffusion: the autoencoder, the denoiser, the text encoder and the noise schedule, together.

The class only holds the parts and converts between images and scaled latents; the noise process
and the samplers are separate functions that take it (see STYLE.md).
"""
from __future__ import annotations

import torch
from torch import nn

from autoencoder import AutoencoderKL

from .config import LDMConfig
from .schedule import alphas_cumprod_from_betas, make_betas


class LatentDiffusion(nn.Module):
    """Latent diffusion model (Rombach et al. 2022).

    Attributes: `autoencoder` (AutoencoderKL), `denoiser` and `text_encoder` (None where the model
    has none), `alphas_cumprod` (float32 [T]), `parameterization` ("eps", "v" or "x0") and
    `scale_factor` (from the autoencoder's config: one home for the constant).
    """

    def __init__(self, config: LDMConfig):
        super().__init__()
        self.config = config
        self.autoencoder = AutoencoderKL(config.autoencoder)
        self.denoiser: nn.Module | None = None
        self.text_encoder: nn.Module | None = None
        betas = make_betas(config.beta_schedule, config.timesteps, config.linear_start, config.linear_end)
        self.register_buffer("alphas_cumprod", alphas_cumprod_from_betas(betas))

    def _apply(self, fn, recurse=True):
        # `.half()` / `.to(dtype)` would round the schedule; it stays float32 and only changes device.
        schedule = self.alphas_cumprod
        super()._apply(fn, recurse)
        self.alphas_cumprod = schedule.to(self.alphas_cumprod.device)
        return self

    @property
    def parameterization(self) -> str:
        return self.config.parameterization

    @property
    def scale_factor(self) -> float:
        return self.config.autoencoder.scale_factor

    def encode_images(self, images: torch.Tensor, *, sample: bool = True,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> diffusion latents `z = scale_factor * posterior.sample()` (LDM sec. 3)."""
        posterior = self.autoencoder.encode(images)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.scale_factor * z

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> images in about [-1, 1]: `decode(z / scale_factor)`."""
        return self.autoencoder.decode(latents / self.scale_factor)
