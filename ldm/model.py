"""LatentDiffusion: the autoencoder, the denoiser, the text encoder and the noise schedule, together.

The class only holds the parts and converts between images and scaled latents; the noise process
and the samplers are separate functions that take it (see STYLE.md).
"""
from __future__ import annotations

import torch
from torch import nn

from autoencoder import AutoencoderKL, InputError

from . import pipeline, samplers
from .attention import fuse_qkv_projections
from .config import LDMConfig
from .schedule import NoiseSchedule
from .text import build_text_encoder
from .unet import build_denoiser


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
        self.denoiser: nn.Module | None = build_denoiser(config.denoiser) if config.denoiser else None
        self.text_encoder: nn.Module | None = build_text_encoder(config.text_encoder) if config.text_encoder else None
        schedule = NoiseSchedule.make(config.beta_schedule, config.timesteps, config.linear_start, config.linear_end,
                                      zero_terminal_snr=config.zero_terminal_snr)
        self._config_schedule = schedule
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod)

    def _apply(self, fn, recurse=True):
        # `.half()` / `.to(dtype)` would round the schedule; it stays float32 and only changes device.
        schedule = self.alphas_cumprod
        super()._apply(fn, recurse)
        self.alphas_cumprod = schedule.to(self.alphas_cumprod.device)
        return self

    def fuse_qkv_projections(self) -> None:
        """One GEMM for the denoiser's Q, K, V projections at inference (see `ldm.attention.fuse_qkv_projections`)."""
        if self.denoiser is None:
            raise InputError("this model has no denoiser, so there is nothing to fuse; load a full latent diffusion checkpoint")
        if fuse_qkv_projections(self.denoiser) == 0:
            raise InputError("this model's denoiser has no attention layers to fuse; leave fuse_qkv_projections off")

    def unfuse_qkv_projections(self) -> None:
        """Back to separate Q, K, V projections; frees the fused copies."""
        if self.denoiser is not None:
            fuse_qkv_projections(self.denoiser, fuse=False)

    @property
    def parameterization(self) -> str:
        return self.config.parameterization

    @property
    def scale_factor(self) -> float:
        return self.config.autoencoder.scale_factor

    @property
    def schedule(self) -> NoiseSchedule:
        """Every table of the noise process: the config's (derived in float64), or, where a checkpoint
        brought a different `alphas_cumprod`, rebuilt from that."""
        if torch.equal(self.alphas_cumprod.cpu(), self._config_schedule.alphas_cumprod):
            return self._config_schedule
        return NoiseSchedule.from_alphas_cumprod(self.alphas_cumprod)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, uncond: torch.Tensor | None = None, *, x_T: torch.Tensor,
               sampler: str = "ddim", steps: int = 50, guidance_scale: float = 1.0, eta: float = 0.0,
               generator: torch.Generator | None = None, callback=None, guidance_rescale: float = 0.0,
               init_latent: torch.Tensor | None = None, strength: float = 1.0,
               keep_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Sample latents with classifier-free guidance (in the denoiser's latent space, before `/ scale_factor`).

        `cond` / `uncond` are text-encoder contexts (B, tokens, dim); `x_T` is the starting noise
        (B, C, h, w). See `ldm.samplers.sample` for the samplers and for img2img (`init_latent`, `strength`).
        """
        if self.denoiser is None:
            raise InputError("this model has no denoiser, so it cannot sample; load a full latent diffusion checkpoint")
        if cond.shape[0] != x_T.shape[0]:
            raise InputError(f"cond has batch {cond.shape[0]} but x_T has batch {x_T.shape[0]}; give one context per sample")
        model_fn = samplers.guided_model_fn(self.denoiser, cond, uncond, guidance_scale=guidance_scale,
                                            guidance_rescale=guidance_rescale)
        return samplers.sample(model_fn, x_T, self.schedule, sampler=sampler, steps=steps,
                               parameterization=self.parameterization, eta=eta, generator=generator,
                               callback=callback, init_latent=init_latent, strength=strength, keep_mask=keep_mask)

    def generate(self, prompts: str | list[str], *, negative_prompt: str | None = None, height: int | None = None,
                 width: int | None = None, steps: int = 50, sampler: str = "ddim", guidance_scale: float = 7.5,
                 eta: float = 0.0, seed: int | None = None, n_samples: int = 1, init_image=None,
                 strength: float = 0.75, mask=None, callback=None, batch_size: int = 4) -> list:
        """Prompts -> list of PIL images (text-to-image, image-to-image, inpainting); see `ldm.pipeline.generate`."""
        return pipeline.generate(self, prompts, negative_prompt=negative_prompt, height=height, width=width,
                                 steps=steps, sampler=sampler, guidance_scale=guidance_scale, eta=eta, seed=seed,
                                 n_samples=n_samples, init_image=init_image, strength=strength, mask=mask,
                                 callback=callback, batch_size=batch_size)

    def encode_images(self, images: torch.Tensor, *, sample: bool = True,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> diffusion latents `z = scale_factor * posterior.sample()` (LDM sec. 3)."""
        posterior = self.autoencoder.encode(images)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.scale_factor * z

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> images in about [-1, 1]: `decode(z / scale_factor)`."""
        return self.autoencoder.decode(latents / self.scale_factor)
