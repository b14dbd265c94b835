"""LatentDiffusion: the autoencoder, the denoiser, the text encoder and the noise schedule, together.

The class only holds the parts and converts between images and scaled latents; the noise process
and the samplers are separate functions that take it (see STYLE.md). `LatentDiffusion.generate`
(prompts -> PIL images) is `ldm.pipeline.generate`, attached by that module: the pipeline is a
layer over the model, and this module never imports it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from autoencoder import AutoencoderKL
from common.errors import InputError
from ldm import samplers
from ldm.conditioner import build_conditioning
from ldm.config import LDMConfig
from ldm.denoisers import build_denoiser
from ldm.denoisers.attention import fuse_qkv_projections
from ldm.diffusion.schedule import NoiseSchedule
from ldm.samplers.guidance import Conditioning, as_denoiser_kwargs


def check_finite_options(**options: float) -> None:
    """InputError naming the first option that is NaN or infinite (NaN passes every `<` / `>` range check)."""
    for name, value in options.items():
        if not math.isfinite(value):
            raise InputError(f"{name} must be a finite number, got {value}")


class LatentDiffusion(nn.Module):
    """Latent diffusion model (Rombach et al. 2022).

    Attributes: `autoencoder` (AutoencoderKL), `denoiser` and `text_encoder` (None where the model
    has none; SDXL's is its conditioner, which also embeds image sizes), `alphas_cumprod` (float32 [T]),
    `parameterization` ("eps", "v" or "x0") and `scale_factor` (from the autoencoder's config: one home
    for the constant).
    """

    def __init__(self, config: LDMConfig):
        super().__init__()
        self.config = config
        self.autoencoder = AutoencoderKL(config.autoencoder)
        self.denoiser: nn.Module | None = None if config.denoiser is None else build_denoiser(config.denoiser)
        self.text_encoder: nn.Module | None = (None if config.text_encoder is None
                                               else build_conditioning(config.text_encoder))
        vector = getattr(self.text_encoder, "vector_dim", None)
        wanted = getattr(config.denoiser, "vector_dim", None)
        if self.text_encoder is not None and config.denoiser is not None and vector != wanted:
            raise InputError(f"the text conditioning gives a vector y of width {vector} but the denoiser takes "
                             f"{wanted} (adm_in_channels): the text encoder and denoiser configs do not belong together")
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
        """One GEMM for the denoiser's Q, K, V projections at inference (see `ldm.denoisers.attention.fuse_qkv_projections`)."""
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
    def concat_channels(self) -> int:
        """Input channels of the denoiser beyond the latent's: 0, or 5 for an SD inpainting UNet (mask +
        masked-image latent), read from the config."""
        if self.config.denoiser is None:
            return 0
        return self.config.denoiser.in_channels - self.config.autoencoder.embed_dim

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this many pixels: the autoencoder's factor times the denoiser's
        own (`latent_multiple`: 2 ** downsamplings of a UNet, the patch size of a DiT); e.g. 64 for SD."""
        own = 1 if self.config.denoiser is None else self.config.denoiser.latent_multiple
        return self.autoencoder.downsampling_factor * own

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
    def sample(self, cond: Conditioning, uncond: Conditioning | None = None, *, x_T: torch.Tensor,
               sampler: str = "ddim", steps: int = 50, guidance_scale: float = 1.0, eta: float = 0.0,
               generator: torch.Generator | None = None, callback=None, guidance_rescale: float = 0.0,
               init_latent: torch.Tensor | None = None, strength: float = 1.0,
               keep_mask: torch.Tensor | None = None, concat: torch.Tensor | None = None,
               timestep_spacing: str | None = None, start_step: int = 0, end_step: int | None = None) -> torch.Tensor:
        """Sample latents with classifier-free guidance (in the denoiser's latent space, before `/ scale_factor`).

        `cond` / `uncond` are text-encoder contexts (B, tokens, dim), or dicts {"context": ..., "y": ...}
        where the denoiser also takes a vector (SDXL: `text_encoder.condition(...)` gives them); `x_T` is the
        starting noise (B, C, h, w). `timestep_spacing` defaults to the model's (`config.timestep_spacing`:
        sgm's for SDXL); `start_step` / `end_step` run part of the steps (a base -> refiner hand-off). See `ldm.samplers.sample` for the samplers and for img2img (`init_latent`, `strength`)
        and inpainting by blending (`keep_mask`). `concat` (B, `concat_channels`, h, w) is joined to x on
        the channel axis at every denoiser call: the original LDM's `c_concat`, e.g. SD inpainting's mask
        and masked-image latent.
        """
        if self.denoiser is None:
            raise InputError("this model has no denoiser, so it cannot sample; load a full latent diffusion checkpoint")
        check_finite_options(guidance_scale=guidance_scale, eta=eta, guidance_rescale=guidance_rescale,
                             strength=strength)
        batch = as_denoiser_kwargs(cond)["context"].shape[0]
        if batch != x_T.shape[0]:
            raise InputError(f"cond has batch {batch} but x_T has batch {x_T.shape[0]}; give one context per sample")
        given = 0 if concat is None else concat.shape[1]
        if given != self.concat_channels:
            raise InputError(f"this denoiser takes {self.concat_channels} extra input channels (concat) but "
                             f"{given} were given; inpainting models need a mask and an init image")
        getattr(self.denoiser, "reset", lambda: None)()  # a denoiser with state across steps (DeepCache) starts afresh
        denoiser = self.denoiser
        weights = next((p.dtype for p in self.denoiser.parameters()), x_T.dtype)
        if weights != x_T.dtype and not torch.is_autocast_enabled(x_T.device.type):
            def denoiser(x, t, **conditioning):  # e.g. bf16 weights on a CPU: the sampler's arithmetic stays fp32
                cast = {k: v.to(weights) if torch.is_tensor(v) else v for k, v in conditioning.items()}
                return self.denoiser(x.to(weights), t, **cast).to(x.dtype)
        if concat is not None:
            inner = denoiser

            def denoiser(x, t, **conditioning):  # under guidance x holds [uncond, cond]: repeat the extra channels
                extra = concat.repeat(x.shape[0] // concat.shape[0], 1, 1, 1).to(x.dtype)
                return inner(torch.cat([x, extra], dim=1), t, **conditioning)
        model_fn = samplers.guided_model_fn(denoiser, cond, uncond, guidance_scale=guidance_scale,
                                            guidance_rescale=guidance_rescale)
        return samplers.sample(model_fn, x_T, self.schedule, sampler=sampler, steps=steps,
                               parameterization=self.parameterization, eta=eta, generator=generator,
                               callback=callback, init_latent=init_latent, strength=strength, keep_mask=keep_mask,
                               timestep_spacing=timestep_spacing or self.config.timestep_spacing,
                               start_step=start_step, end_step=end_step)

    def encode_images(self, images: torch.Tensor, *, sample: bool = True, generator: torch.Generator | None = None,
                      eps: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> diffusion latents `z = scale_factor * posterior.sample()` (LDM sec. 3)."""
        posterior = self.autoencoder.encode(images)
        if not sample:
            return self.scale_factor * posterior.mode()
        return self.latents_from_posterior(posterior.mean, posterior.std, generator=generator, eps=eps)

    def latents_from_posterior(self, mean: torch.Tensor, std: torch.Tensor, *,
                               generator: torch.Generator | None = None,
                               eps: torch.Tensor | None = None) -> torch.Tensor:
        """Diffusion latents from the moments of q(z | x): `scale_factor * (mean + std * eps)`, eps ~ N(0, I)
        (drawn from `generator`, or given).

        `encode_images` and training on cached moments (`tools/encode_latents.py`) both sample here.
        """
        if eps is None:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.scale_factor * (mean + std * eps)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> images in about [-1, 1]: `decode(z / scale_factor)`."""
        return self.autoencoder.decode(latents / self.scale_factor)
