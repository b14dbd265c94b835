"""Text-to-image, image-to-image and inpainting: prompts in, PIL images out.

    text -> text encoder -> (cond, uncond) -> sampler loop on x_T -> / scale_factor -> decoder -> uint8

Each batch's latents and pixels are checked once for NaN / inf, so that corrupt weights or a float16
overflow never come out as black images (see `_finite`).
"""
from __future__ import annotations

import contextlib
import functools
import random
import warnings
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from common.errors import InputError
from ldm import samplers
from ldm.images import image_to_tensor, mask_to_tensor, to_rgb, to_uint8
from ldm.model import LatentDiffusion, check_finite_options
from ldm.samplers.guidance import Conditioning
from ldm.text.prompts import pad_to_same_length

MAX_SEED = 2 ** 32 - 1  # the range of a random seed
LAST_SEED = 2 ** 63 - 1  # the largest seed + k (its generators also use seed + 2**32, below 2**64)


def native_size(model: LatentDiffusion) -> int:
    """The model's native image size in pixels: its latent size (config.image_size) times f."""
    latent = model.config.image_size or model.config.autoencoder.resolution // model.autoencoder.downsampling_factor
    return latent * model.autoencoder.downsampling_factor


def check_size(height: int, width: int, factor: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if value < factor:
            raise InputError(f"{name} {value} is too small: use at least {factor} pixels (a multiple of {factor})")
        if value % factor:
            lower, upper = value // factor * factor, (value // factor + 1) * factor
            raise InputError(f"{name} {value} is not a multiple of {factor}; use {lower} or {upper}")


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` (CUDA: the driver's count; CPU: MemAvailable), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def resolve_size(model: LatentDiffusion, height: int | None = None, width: int | None = None,
                 init_image: Image.Image | None = None, *, dtype: torch.dtype | None = None,
                 batch_size: int | None = None, n_images: int | None = None) -> tuple[int, int]:
    """(height, width) of the images `generate` makes, checked: given, else the init image's, else the model's
    native size; a multiple of `model.size_multiple`, and small enough for memory (`check_memory`, with the
    batch and image count when given; `dtype`: the compute dtype, default the autoencoder's)."""
    if init_image is not None:
        width = init_image.width if width is None else width
        height = init_image.height if height is None else height
    height = native_size(model) if height is None else height
    width = native_size(model) if width is None else width
    check_size(height, width, model.size_multiple)
    check_memory(model, height, width, model.alphas_cumprod.device, dtype or next(model.autoencoder.parameters()).dtype,
                 batch_size=batch_size, n_images=n_images)
    return height, width


def check_memory(model: LatentDiffusion, height: int, width: int, device: torch.device, dtype: torch.dtype, *,
                 batch_size: int | None = None, n_images: int | None = None) -> None:
    """Refuse up front a request whose memory cannot fit, from lower bounds of what it holds at once:

    - decoding: the batch is decoded at once, and the decoder holds several full-size feature maps of
      ch * ch_mult[0] channels per image (about 7, measured for the SD decoder at 512 to 2048 px,
      bench/vae_decode.py); tiled decoding (--vae-tiling) is bounded by its tiles and not counted;
    - sampling: the denoiser's first-level feature maps (UNet: model_channels * channel_mult[0] at the latent
      size; DiT: hidden_size per patch), 3 of them (a block's input, output and the skip or residual), for
      twice the batch (classifier-free guidance runs the conditional and unconditional halves together);
    - the output: `n_images` 8-bit RGB images, held in CPU memory until the call returns them.

    `batch_size` is the number of images sampled and decoded at once (`generate`'s min(batch_size, images)),
    `n_images` the number one call returns; left out (None), only the decoding of one image is checked (what
    `resolve_size` checks without them)."""
    itemsize = torch.finfo(dtype).bits // 8
    free = available_memory(device)
    size, gib = f"{width}x{height}", lambda n_bytes: f"{n_bytes / 2 ** 30:.1f}"
    autoencoder = model.config.autoencoder
    decode_one = 0 if model.autoencoder.tiling is not None else (
        7 * height * width * autoencoder.ch * autoencoder.ch_mult[0] * itemsize)
    if free is not None and decode_one > free:
        raise InputError(f"{size} needs about {gib(decode_one)} GiB to decode one image but {gib(free)} GiB are "
                         "free: lower the size (--H / --W, or a smaller init image) or use --vae-tiling")
    if batch_size is None and n_images is None:
        return
    batch_size, n_images = batch_size or 1, n_images or 1
    latent_h, latent_w = height // model.autoencoder.downsampling_factor, width // model.autoencoder.downsampling_factor
    denoiser, features = model.config.denoiser, 0  # values in one first-level feature map of one image
    if hasattr(denoiser, "model_channels"):  # UNet: its first level runs at the latent size
        features = denoiser.model_channels * denoiser.channel_mult[0] * latent_h * latent_w
    elif hasattr(denoiser, "hidden_size"):  # DiT: one token per patch
        features = denoiser.hidden_size * (latent_h // denoiser.patch_size) * (latent_w // denoiser.patch_size)
    per_image = max(decode_one, 2 * 3 * features * itemsize)
    if free is not None and batch_size * per_image > free:
        if per_image <= free:
            raise InputError(f"{batch_size} images of {size} at once need about {gib(batch_size * per_image)} GiB to "
                             f"sample and decode but {gib(free)} GiB are free: use --batch_size {free // per_image} "
                             "or lower (or a smaller size, or --vae-tiling)")
        raise InputError(f"{size} needs about {gib(per_image)} GiB to sample one image but {gib(free)} GiB are free: "
                         "lower the size (--H / --W, or a smaller init image)")
    output = n_images * height * width * 3
    cpu_free = free if device.type == "cpu" else available_memory(torch.device("cpu"))
    if cpu_free is not None and output > cpu_free:
        raise InputError(f"{n_images} images of {size} need about {gib(output)} GiB of memory to hold until they "
                         f"are written but {gib(cpu_free)} GiB are free: lower --n_samples (or the number of "
                         "prompts) and use --n_iter for more images")


def _condition(model: LatentDiffusion, prompts: list[str], dtype: torch.dtype, micro: dict, *,
               unconditional: bool = False) -> Conditioning:
    """The denoiser's conditioning of `prompts`: a context, or for SDXL {"context", "y"} with the size
    micro-conditioning (`Conditioner.condition`; the image size and SDXL pipelines' defaults)."""
    if model.text_encoder is None:
        raise InputError("this model has no text encoder, so it cannot take prompts; load a full text-to-image model")
    cond = model.text_encoder.condition(prompts, unconditional=unconditional, **micro)
    device = model.alphas_cumprod.device
    if isinstance(cond, torch.Tensor):
        return cond.to(device=device, dtype=dtype)
    return {name: value.to(device=device, dtype=dtype) for name, value in cond.items()}


@torch.inference_mode()  # no autograd bookkeeping at all (images out, nothing to differentiate)
def generate(model: LatentDiffusion, prompts: str | Sequence[str], *, negative_prompt: str | None = None,
             height: int | None = None, width: int | None = None, steps: int = 50, sampler: str = "ddim",
             guidance_scale: float = 7.5, eta: float = 0.0, seed: int | None = None, n_samples: int = 1,
             init_image: Image.Image | None = None, strength: float = 0.75, mask: Image.Image | None = None,
             callback: Callable[[dict], None] | None = None, batch_size: int = 4,
             original_size: tuple[int, int] | None = None, crop: tuple[int, int] = (0, 0),
             target_size: tuple[int, int] | None = None, aesthetic_score: float | None = None,
             refiner: LatentDiffusion | None = None, refiner_switch: float = 0.8,
             timestep_spacing: str | None = None) -> list[Image.Image]:
    """Images for each prompt, `n_samples` each; image k uses seed `seed + k` (reproducible alone: its noise
    does not depend on the batch; bit-exact when generated with the same `batch_size`, otherwise to
    within the rounding of batched kernels).

    Each image's `.info` holds its prompt, negative prompt and seed. With `init_image`: SDEdit
    image-to-image at `strength`; with `mask` too (white = repaint): inpainting, by the masked
    blend for any model or, for a 9-channel SD inpainting UNet, through its extra input channels.

    SDXL's micro-conditioning (height, width pairs): `original_size` and `target_size` default to the
    output size and `crop` to (0, 0), as SDXL pipelines set them; `aesthetic_score` is the refiner's
    (default 6.0; 2.5 on the unconditional side). Other models ignore them. With `refiner` (an SDXL
    refiner), the base runs the noise levels above `refiner_switch` of the way (timesteps t >= (1 -
    switch) T, as diffusers' `denoising_end`) and the refiner the rest, from the base's latent.
    `timestep_spacing` overrides the model's (see `ldm.samplers.SPACINGS`).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise InputError("no prompts given")
    if n_samples < 1 or batch_size < 1:
        raise InputError(f"n_samples and batch_size must be >= 1, got {n_samples} and {batch_size}")
    check_finite_options(guidance_scale=guidance_scale, eta=eta, strength=strength)
    if seed is None:
        seed = random.randint(0, MAX_SEED)
    n_images = len(prompts) * n_samples
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= LAST_SEED - (n_images - 1):
        raise InputError(f"seed must be a whole number from 0 to {LAST_SEED - (n_images - 1)} (image k uses seed + k, "
                         f"up to 2**63 - 1), got {seed!r}")
    f = model.autoencoder.downsampling_factor
    height, width = resolve_size(model, height, width, init_image, batch_size=min(batch_size, n_images),
                                 n_images=n_images)
    if mask is not None and init_image is None:
        raise InputError("a mask needs an init image (inpainting keeps the unmasked part of it)")
    device = model.alphas_cumprod.device
    dtype = next(model.autoencoder.parameters()).dtype

    check_refiner(model, refiner, refiner_switch, init_image)
    micro = {"image_size": (height, width), "original_size": original_size, "crop": crop, "target_size": target_size}
    if aesthetic_score is not None:
        micro["aesthetic_score"] = aesthetic_score
    jobs = [(prompt, seed + k) for k, prompt in enumerate(p for p in prompts for _ in range(n_samples))]
    uncond_text = negative_prompt or ""
    init = _prepare_init(model, init_image, mask, height, width, device, dtype)
    sampling_parts = ("text_encoder", "denoiser") + (() if init is None else ("autoencoder.encoder",
                                                                               "autoencoder.quant_conv"))
    options = dict(steps=steps, sampler=sampler, guidance_scale=guidance_scale, eta=eta, strength=strength,
                   callback=callback, device=device, micro=micro, refiner=refiner, refiner_switch=refiner_switch,
                   timestep_spacing=timestep_spacing)
    images: list[Image.Image] = []
    chunk = batch_size
    start = 0
    while start < len(jobs):
        batch = jobs[start:start + chunk]

        def sample(dtype: torch.dtype) -> torch.Tensor:
            return _sample_batch(model, batch, uncond_text, init, height // f, width // f, dtype=dtype, **options)

        def decode(dtype: torch.dtype) -> torch.Tensor:
            return model.decode_latents(latents.to(dtype))

        try:
            latents = _finite(sample, dtype, "latents", "sampling (text encoder, denoiser and sampler)",
                              _parts(model, *sampling_parts), device)
            # no retry here: AutoencoderKL.decode itself decodes again in float32 after a 16-bit overflow
            pixels = _finite(decode, dtype, "pixels", "decoding (autoencoder decoder)",
                             _parts(model, "autoencoder.post_quant_conv", "autoencoder.decoder"), device, retry=False)
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
    init_image = to_rgb(init_image)  # 16-bit and transparent images as training reads them
    if init_image.size != (width, height):
        init_image = init_image.resize((width, height), Image.LANCZOS)
    return {"pixels": image_to_tensor(init_image).to(device), "repaint": repaint,
            "keep_pixels": None if repaint is None else 1 - repaint}


def _sample_batch(model, batch, uncond_text, init, latent_h, latent_w, *, steps, sampler, guidance_scale, eta,
                  strength, callback, device, dtype, micro, refiner, refiner_switch, timestep_spacing) -> torch.Tensor:
    prompts = [prompt for prompt, _ in batch]
    channels = model.config.autoencoder.embed_dim
    # x_T per image from its own CPU generator: the same seed gives the same noise on any device.
    x_T = torch.cat([torch.randn((1, channels, latent_h, latent_w), generator=torch.Generator().manual_seed(s))
                     for _, s in batch]).to(device=device, dtype=dtype)
    # Ancestral noise and inpainting blends: one generator per image (seed + 2**32, apart from x_T's).
    generator = [torch.Generator().manual_seed(s + 2 ** 32) for _, s in batch]
    cond = _condition(model, prompts, dtype, micro)
    uncond = (_condition(model, [uncond_text] * len(batch), dtype, micro, unconditional=True)
              if guidance_scale != 1.0 else None)
    if uncond is not None:  # long prompts are encoded in 75-token chunks: both sides get the same number
        cond, uncond = pad_to_same_length(model.text_encoder, cond, uncond)
    if refiner is not None:
        return _sample_with_refiner(model, refiner, prompts, uncond_text, x_T, cond, uncond, micro, refiner_switch,
                                    dtype=dtype, sampler=sampler, steps=steps, guidance_scale=guidance_scale,
                                    eta=eta, generator=generator, callback=callback, timestep_spacing=timestep_spacing)
    kwargs = dict(sampler=sampler, steps=steps, guidance_scale=guidance_scale, eta=eta, generator=generator,
                  callback=callback, timestep_spacing=timestep_spacing)
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


def check_refiner(model: LatentDiffusion, refiner: LatentDiffusion | None, switch: float,
                  init_image: Image.Image | None) -> None:
    """A refiner hand-off needs an SDXL base and an SDXL refiner (their latents must agree) and a switch in (0, 1)."""
    if refiner is None:
        return
    check_finite_options(refiner_switch=switch)
    if not 0 < switch < 1:
        raise InputError(f"the refiner switch must be between 0 and 1 (the share of the noise levels the base "
                         f"runs, e.g. 0.8), got {switch}")
    if init_image is not None:
        raise InputError("the refiner hand-off is for text-to-image; refine an image with img2img on the refiner")
    if _takes_aesthetic_score(model):
        raise InputError("the base model is an SDXL refiner (it takes an aesthetic score): pass the SDXL base as the "
                         "model and the refiner as --refiner")
    if not _takes_aesthetic_score(refiner):
        raise InputError("the --refiner model is not an SDXL refiner (it takes no aesthetic score; is it a base "
                         "model?): pass sd_xl_refiner_1.0 or a fine-tune of it")
    if (refiner.config.autoencoder.embed_dim, refiner.scale_factor) != (model.config.autoencoder.embed_dim,
                                                                        model.scale_factor):
        raise InputError("the refiner's latent space (channels, scale factor) differs from the base's; pass a "
                         "refiner of the same family")


def _takes_aesthetic_score(model: LatentDiffusion) -> bool:
    return "aesthetic_score" in getattr(model.config.text_encoder, "size_inputs", ())


def _sample_with_refiner(model, refiner, prompts, uncond_text, x_T, cond, uncond, micro, switch, *, dtype, steps,
                         timestep_spacing, **kwargs) -> torch.Tensor:
    """The ensemble of expert denoisers (Podell et al. 2023, sec. 2.5): the base down to the switch level, then the
    refiner, with its own conditioning, on the same plan from there (diffusers' denoising_end / denoising_start)."""
    spacing = timestep_spacing or model.config.timestep_spacing
    timesteps = samplers.plan(kwargs["sampler"], model.schedule, steps, spacing).timesteps
    cutoff = round(model.schedule.num_timesteps * (1 - switch))
    handoff = int((timesteps >= cutoff).sum())
    if not 0 < handoff < len(timesteps):
        raise InputError(f"with {steps} steps, a refiner switch of {switch} leaves no steps to the "
                         f"{'refiner' if handoff else 'base'}; use more steps or a switch nearer 0.5")
    latent = model.sample(cond, uncond, x_T=x_T, steps=steps, timestep_spacing=spacing, end_step=handoff, **kwargs)
    refiner_cond = _condition(refiner, prompts, dtype, micro)
    refiner_uncond = (_condition(refiner, [uncond_text] * len(prompts), dtype, micro, unconditional=True)
                      if uncond is not None else None)
    if refiner_uncond is not None:
        refiner_cond, refiner_uncond = pad_to_same_length(refiner.text_encoder, refiner_cond, refiner_uncond)
    return refiner.sample(refiner_cond, refiner_uncond, x_T=latent, steps=steps, timestep_spacing=spacing,
                          start_step=handoff, **kwargs)


LOW_PRECISION = (torch.float16, torch.bfloat16)
Parts = list[tuple[str, nn.Module]]  # (the part's name in the model's state_dict, module)


def _parts(model: LatentDiffusion, *names: str) -> Parts:
    parts = [(name, functools.reduce(getattr, name.split("."), model)) for name in names]
    return [(name, part) for name, part in parts if part is not None]


def _finite(run: Callable[[torch.dtype], torch.Tensor], dtype: torch.dtype, what: str, stage: str, parts: Parts,
            device: torch.device, *, retry: bool = True) -> torch.Tensor:
    """`run(dtype)`, checked once for NaN / inf. Computed in 16 bits (weights or autocast), a non-finite result
    is most likely an overflow: with `retry`, run again in float32 (warned once) and keep that if finite.
    Otherwise an InputError naming the stage and the likely cause, a NaN / inf weight where one is found."""
    out = run(dtype)
    if bool(torch.isfinite(out).all()):  # the one read-back per batch and stage
        return out
    low = _low_precision(parts, device)
    low_name = str(low).removeprefix("torch.")
    if low is not None and retry:
        with _in_float32(parts, device):
            out = run(torch.float32)
        if bool(torch.isfinite(out).all()):
            warnings.warn(f"{low_name} overflowed in {stage} (NaN/inf {what}); ran that part again in float32",
                          RuntimeWarning)
            return out
    precision = f"in {low_name} and again in float32" if low is not None else "in float32"
    bad = _non_finite_weight(parts)
    if bad is not None:
        raise InputError(f"{stage} gave NaN/inf {what} {precision}: the {bad} holds NaN/inf, so the checkpoint is "
                         "corrupt; check the checkpoint (download or convert it again)")
    raise InputError(f"{stage} gave NaN/inf {what} {precision} with finite weights: likely weights out of range "
                     "(a corrupt or wrongly converted checkpoint) or extreme settings (guidance scale); "
                     "check the checkpoint")


def _low_precision(parts: Parts, device: torch.device) -> torch.dtype | None:
    """The 16-bit dtype the parts compute in (their weights' or autocast's), None for float32."""
    for _, part in parts:
        for tensor in part.parameters():
            if tensor.dtype in LOW_PRECISION:
                return tensor.dtype
    if torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) in LOW_PRECISION:
        return torch.get_autocast_dtype(device.type)
    return None


@contextlib.contextmanager
def _in_float32(parts: Parts, device: torch.device) -> Iterator[None]:
    """Autocast off, and the parts' 16-bit weights and buffers in float32 for the block; cast back afterwards,
    which restores them exactly. One tensor at a time: a part holds its float32 size (twice its 16-bit one)
    meanwhile, never both copies; the rest of the model stays as it is."""
    cast = [(part, name, tensor.dtype) for _, part in parts
            for name, tensor in [*part.named_parameters(remove_duplicate=False),
                                 *part.named_buffers(remove_duplicate=False)] if tensor.dtype in LOW_PRECISION]

    def set_dtype(part: nn.Module, name: str, dtype: torch.dtype) -> None:
        owner_name, _, attribute = name.rpartition(".")
        owner = part.get_submodule(owner_name)
        tensor = getattr(owner, attribute)
        with torch.inference_mode(False):  # ordinary tensors, so that training and load_state_dict still work
            if isinstance(tensor, nn.Parameter):
                tensor.data = tensor.data.to(dtype)
            else:
                setattr(owner, attribute, tensor.to(dtype))

    try:
        for part, name, _ in cast:
            set_dtype(part, name, torch.float32)
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        for part, name, dtype in cast:
            set_dtype(part, name, dtype)


def _non_finite_weight(parts: Parts) -> str | None:
    """"weight NAME" (its state_dict key) for the first weight holding NaN / inf, or None. Buffers are left
    out: some hold -inf by design (causal attention masks)."""
    for prefix, part in parts:
        for name, tensor in part.named_parameters():
            if not bool(torch.isfinite(tensor).all()):
                return f"weight {prefix}.{name}"
    return None


# The model's method: `LatentDiffusion.generate(prompts, ...)` is this function (the model never imports it).
LatentDiffusion.generate = generate
