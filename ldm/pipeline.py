"""Text-to-image, image-to-image and inpainting: prompts in, PIL images out.

    text -> text encoder -> (cond, uncond) -> sampler loop on x_T -> / scale_factor -> decoder -> uint8
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from common.errors import InputError
from ldm.images import image_to_tensor, mask_to_tensor, to_uint8
from ldm.model import LatentDiffusion

MAX_SEED = 2 ** 32 - 1


def native_size(model: LatentDiffusion) -> int:
    """The model's native image size in pixels: its latent size (config.image_size) times f."""
    latent = model.config.image_size or model.config.autoencoder.resolution // model.autoencoder.downsampling_factor
    return latent * model.autoencoder.downsampling_factor


def check_size(height: int, width: int, factor: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if value < factor or value % factor:
            lower, upper = max(factor, value // factor * factor), (value // factor + 1) * factor
            raise InputError(f"{name} {value} is not a multiple of {factor}; use {lower} or {upper}")


def _encode_prompts(model: LatentDiffusion, prompts: list[str]) -> torch.Tensor:
    if model.text_encoder is None:
        raise InputError("this model has no text encoder, so it cannot take prompts; load a full text-to-image model")
    return model.text_encoder.encode(prompts).to(model.alphas_cumprod.device)


@torch.inference_mode()  # no autograd bookkeeping at all (images out, nothing to differentiate)
def generate(model: LatentDiffusion, prompts: str | Sequence[str], *, negative_prompt: str | None = None,
             height: int | None = None, width: int | None = None, steps: int = 50, sampler: str = "ddim",
             guidance_scale: float = 7.5, eta: float = 0.0, seed: int | None = None, n_samples: int = 1,
             init_image: Image.Image | None = None, strength: float = 0.75, mask: Image.Image | None = None,
             callback: Callable[[dict], None] | None = None, batch_size: int = 4) -> list[Image.Image]:
    """Images for each prompt, `n_samples` each; image k uses seed `seed + k` (reproducible alone: its noise
    does not depend on the batch; bit-exact when generated with the same `batch_size`, otherwise to
    within the rounding of batched kernels).

    Each image's `.info` holds its prompt, negative prompt and seed. With `init_image`: SDEdit
    image-to-image at `strength`; with `mask` too (white = repaint): inpainting, by the masked
    blend for any model or, for a 9-channel SD inpainting UNet, through its extra input channels.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise InputError("no prompts given")
    if n_samples < 1 or batch_size < 1:
        raise InputError(f"n_samples and batch_size must be >= 1, got {n_samples} and {batch_size}")
    if seed is None:
        seed = random.randint(0, MAX_SEED)
    f = model.autoencoder.downsampling_factor
    if init_image is not None:
        width, height = width or init_image.width, height or init_image.height
    height, width = height or native_size(model), width or native_size(model)
    check_size(height, width, f)
    if mask is not None and init_image is None:
        raise InputError("a mask needs an init image (inpainting keeps the unmasked part of it)")
    device = model.alphas_cumprod.device
    dtype = next(model.autoencoder.parameters()).dtype

    jobs = [(prompt, seed + k) for k, prompt in enumerate(p for p in prompts for _ in range(n_samples))]
    uncond_text = negative_prompt or ""
    init = _prepare_init(model, init_image, mask, height, width, device, dtype)
    images: list[Image.Image] = []
    chunk = batch_size
    start = 0
    while start < len(jobs):
        batch = jobs[start:start + chunk]
        try:
            latents = _sample_batch(model, batch, uncond_text, init, height // f, width // f, steps=steps,
                                    sampler=sampler, guidance_scale=guidance_scale, eta=eta, strength=strength,
                                    callback=callback, device=device, dtype=dtype)
            pixels = model.decode_latents(latents)
        except torch.OutOfMemoryError:
            if chunk == 1:
                raise InputError("out of memory even for one image: lower the size, use --vae-tiling "
                                 "or a lower --precision (fp16/bf16)") from None
            chunk = max(1, chunk // 2)  # split the batch and try again
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            continue
        if init is not None and init["keep_pixels"] is not None:  # inpainting: the kept pixels exactly
            keep = init["keep_pixels"]
            pixels = keep * init["pixels"] + (1 - keep) * pixels.float()
        for (prompt, image_seed), array in zip(batch, to_uint8(pixels)):
            image = Image.fromarray(array)
            image.info.update(prompt=prompt, negative_prompt=negative_prompt or "", seed=image_seed)
            images.append(image)
        start += len(batch)
    return images


def _prepare_init(model, init_image, mask, height, width, device, dtype) -> dict | None:
    if init_image is None:
        return None
    repaint = None
    if mask is not None:
        if mask.size != init_image.size:
            raise InputError(f"the mask is {mask.width}x{mask.height} but the init image is "
                             f"{init_image.width}x{init_image.height}; give a mask of the same size")
        repaint = mask_to_tensor(mask.resize((width, height), Image.NEAREST)).to(device)
    if init_image.size != (width, height):
        init_image = init_image.resize((width, height), Image.LANCZOS)
    return {"pixels": image_to_tensor(init_image).to(device), "repaint": repaint,
            "keep_pixels": None if repaint is None else 1 - repaint}


def _sample_batch(model, batch, uncond_text, init, latent_h, latent_w, *, steps, sampler, guidance_scale, eta,
                  strength, callback, device, dtype) -> torch.Tensor:
    prompts = [prompt for prompt, _ in batch]
    channels = model.config.autoencoder.embed_dim
    # x_T per image from its own CPU generator: the same seed gives the same noise on any device.
    x_T = torch.cat([torch.randn((1, channels, latent_h, latent_w), generator=torch.Generator().manual_seed(s))
                     for _, s in batch]).to(device=device, dtype=dtype)
    # Ancestral noise and inpainting blends: one generator per image (seed + 2**32, apart from x_T's).
    generator = [torch.Generator().manual_seed(s + 2 ** 32) for _, s in batch]
    cond = _encode_prompts(model, prompts).to(dtype)
    uncond = _encode_prompts(model, [uncond_text] * len(batch)).to(dtype) if guidance_scale != 1.0 else None
    kwargs = dict(sampler=sampler, steps=steps, guidance_scale=guidance_scale, eta=eta, generator=generator,
                  callback=callback)
    if init is None:
        return model.sample(cond, uncond, x_T=x_T, **kwargs)
    pixels = init["pixels"].to(dtype).expand(len(batch), -1, -1, -1)
    init_latent = model.encode_images(pixels, sample=False)
    repaint = init["repaint"]
    if repaint is None:
        return model.sample(cond, uncond, x_T=x_T, init_latent=init_latent, strength=strength, **kwargs)
    latent_repaint = F.interpolate(repaint, size=(latent_h, latent_w), mode="nearest").to(dtype)
    if model.concat_channels:  # SD inpainting UNet: cat([x, mask, latent of the masked image]) at each step
        concat = torch.cat([latent_repaint.expand(len(batch), -1, -1, -1),
                            model.encode_images(pixels * (1 - repaint), sample=False)], dim=1)
        return model.sample(cond, uncond, x_T=x_T, init_latent=init_latent, strength=strength, concat=concat,
                            **kwargs)
    return model.sample(cond, uncond, x_T=x_T, init_latent=init_latent, strength=strength,
                        keep_mask=1 - latent_repaint, **kwargs)


# The model's method: `LatentDiffusion.generate(prompts, ...)` is this function (the model never imports it).
LatentDiffusion.generate = generate
