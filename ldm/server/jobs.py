"""A1111 generation requests -> checked plans -> images on the worker, with A1111's response and info.

`plan_request` checks everything it can before the request is queued (so bad input is a 422 at
once, naming the field), against the server's limits and the loaded model's sizes;
`run_plan` runs on the model worker: `n_iter` batches of `batch_size` images, image k with seed
seed + k, each PNG with our metadata. /interrupt stops at the next step and, as A1111, returns the
batch's latest denoised estimate decoded; /skip does the same for the batch being sampled and goes on
with the next.

Sizes far beyond a model's native size (A1111 clients send 512 x 512 unless told otherwise; the
default model draws at 32 x 32 and would take minutes there to draw a tiled mess) are sampled at the
native scale and upscaled (Lanczos): past `native_scale_limit` times the native size on a side.
The info says so (`sampled_width`, `sampled_height`). 0 turns this off.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from common.errors import InputError
from ldm import samplers
from ldm.cli import generation_precision
from ldm.cli.generate import lora_requests, parameters_text, png_bytes, png_info, save_numbered, with_ti_hashes
from ldm.images import open_image, to_rgb, to_uint8
from ldm.pipeline import LAST_SEED, MAX_SEED, native_size
from ldm.server.a1111 import A1111_NAMES, GenerationRequest, Img2ImgRequest, parse_infotext, resolve_sampler
from ldm.server.models import Checkpoint, Models
from ldm.server.worker import Interrupted, Progress, Skipped

VERSION = "latent-diffusion-kit 0.1.0"


@dataclass
class Limits:
    """What one request may ask for; GET/POST /sdapi/v1/options under the names in `OPTION_NAMES`."""

    max_pixels: int = 2048 * 2048  # width x height of one image
    max_steps: int = 150  # A1111's slider maximum
    max_images: int = 16  # batch_size x n_iter
    native_scale_limit: float = 4.0


OPTION_NAMES = {"ldm_max_pixels": "max_pixels", "ldm_max_steps": "max_steps", "ldm_max_images": "max_images",
                "ldm_native_scale_limit": "native_scale_limit"}


@dataclass
class Plan:
    """A checked request: what `run_plan` does."""

    request: GenerationRequest
    sampler: str
    seed: int
    width: int | None  # None: the model's native size
    height: int | None
    prompt: str  # without its <lora:...> tags
    loras: list[tuple[Path, float]]
    checkpoint: Checkpoint | None = None  # override_settings' sd_model_checkpoint
    init_image: Image.Image | None = None
    mask: Image.Image | None = None
    ignored_settings: list[str] = field(default_factory=list)


def decode_image(data: str, field_name: str) -> Image.Image:
    """A base64 image (a data: URL too) -> a PIL image, or an InputError naming the field."""
    text = data.split(",", 1)[-1] if data.startswith("data:") else data
    if not text.strip():
        raise InputError(f"{field_name}: empty; send a base64-encoded PNG or JPEG")
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"{field_name}: not valid base64 ({exc}); send the image file's bytes base64-encoded") from None
    try:
        return open_image(io.BytesIO(raw))
    except InputError as exc:
        raise InputError(f"{field_name}: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        raise InputError(f"{field_name}: not an image ({len(raw)} bytes that PIL cannot read); send a PNG, JPEG or "
                         "WebP") from None


def plan_request(request: GenerationRequest, models: Models, limits: Limits) -> Plan:
    """Check `request` against the limits and the loaded model; InputError (a 422) names the first bad field."""
    if request.enable_hr:
        raise InputError("enable_hr: the hires fix is not available here; ask for the final width and height")
    sampler = resolve_sampler(request.sampler_name or request.sampler_index, request.scheduler)
    if not 1 <= request.steps <= limits.max_steps:
        raise InputError(f"steps: must be from 1 to {limits.max_steps} (the server's ldm_max_steps), got {request.steps}")
    if not math.isfinite(request.cfg_scale) or not 0 <= request.cfg_scale <= 100:
        raise InputError(f"cfg_scale: must be a number from 0 to 100, got {request.cfg_scale}")
    if request.eta is not None and not (math.isfinite(request.eta) and 0 <= request.eta <= 1):
        raise InputError(f"eta: must be from 0 to 1, got {request.eta}")
    for name in ("batch_size", "n_iter"):
        if getattr(request, name) < 1:
            raise InputError(f"{name}: must be at least 1, got {getattr(request, name)}")
    images = request.batch_size * request.n_iter
    if images > limits.max_images:
        raise InputError(f"batch_size x n_iter: {images} images, more than the server's ldm_max_images "
                         f"({limits.max_images}) per request; send several requests")
    if request.seed != -1 and not 0 <= request.seed <= LAST_SEED - images + 1:
        raise InputError(f"seed: must be -1 (random) or a whole number from 0 to {LAST_SEED - images + 1}, "
                         f"got {request.seed}")
    multiple, native = models.size_multiple, models.native_size  # the loaded model's; checked again when it runs
    for name in ("width", "height"):
        value = getattr(request, name)
        if value is None:
            continue
        if value < multiple or value % multiple:
            lower, upper = max(multiple, value // multiple * multiple), (value // multiple + 1) * multiple
            raise InputError(f"{name}: {value} is not a multiple of {multiple} (this model's factor); use "
                             f"{lower}{f' or {upper}' if upper != lower else ''}")
    width, height = request.width or native, request.height or native
    if width * height > limits.max_pixels:
        raise InputError(f"width x height: {width}x{height} is more than the server's ldm_max_pixels "
                         f"({limits.max_pixels:,} pixels); ask for a smaller image")
    checkpoint, ignored = None, []
    for key, value in (request.override_settings or {}).items():
        if key == "sd_model_checkpoint":
            checkpoint = models.find(str(value))
        else:
            ignored.append(key)
    try:
        (prompt,), loras = lora_requests(models.lora_args(), [request.prompt])
    except InputError as exc:
        raise InputError(f"prompt: {str(exc).replace('--lora-dir', 'the server --lora-dir')}") from None
    plan = Plan(request, sampler, request.seed if request.seed != -1 else random.randint(0, MAX_SEED),
                request.width, request.height, prompt, loras, checkpoint, ignored_settings=ignored)
    if isinstance(request, Img2ImgRequest):
        _plan_img2img(plan, request)
    return plan


def _plan_img2img(plan: Plan, request: Img2ImgRequest) -> None:
    if not request.init_images:
        raise InputError("init_images: empty; send one base64-encoded image to start from")
    if not math.isfinite(request.denoising_strength) or not 0 < request.denoising_strength <= 1:
        raise InputError(f"denoising_strength: must be in (0, 1] (1: start from noise), got {request.denoising_strength}")
    plan.init_image = to_rgb(decode_image(request.init_images[0], "init_images[0]"))
    if request.mask is not None:
        mask = decode_image(request.mask, "mask")
        if mask.size != plan.init_image.size:
            raise InputError(f"mask: {mask.width}x{mask.height}, but init_images[0] is {plan.init_image.width}x"
                             f"{plan.init_image.height}; send a mask of the init image's size")
        plan.mask = ImageOps.invert(mask.convert("L")) if request.inpainting_mask_invert else mask


def sampled_size(model, width: int, height: int, limit: float) -> tuple[int, int]:
    """The size to sample at: as asked, or for sizes past `limit` x the native size on a side, the native scale."""
    native, multiple = native_size(model), model.size_multiple
    if not limit or max(width, height) <= limit * native:
        return width, height
    scale = native / max(width, height)
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (width, height))


def run_plan(plan: Plan, progress: Progress, models: Models, limits: Limits, *, precision: str,
             outdir: Path | None) -> dict[str, Any]:
    """On the worker: load the model asked for, merge the LoRAs, generate, answer as A1111 does."""
    previous = models.current
    model = models.load(plan.checkpoint)
    models.refresh_embeddings()  # files added to the embeddings folder since are usable at once, as in A1111
    try:
        return _generate(plan, progress, models, model, limits, precision=precision, outdir=outdir)
    finally:
        if plan.checkpoint is not None and plan.request.override_settings_restore_afterwards:
            models.load(previous)


def _generate(plan, progress, models, model, limits, *, precision, outdir) -> dict[str, Any]:
    request, is_img2img = plan.request, plan.init_image is not None
    if is_img2img and plan.width is None and plan.height is None:
        width, height = plan.init_image.size  # A1111 takes the init image's size unless told
        width, height = (max(model.size_multiple, side // model.size_multiple * model.size_multiple)
                         for side in (width, height))
    else:
        width, height = plan.width or native_size(model), plan.height or native_size(model)
    sample_width, sample_height = sampled_size(model, width, height, limits.native_scale_limit)
    lora_hashes = models.use_loras(plan.loras)
    strength = request.denoising_strength if is_img2img else 1.0
    samplers.check_sampler_args(plan.sampler, request.steps, model.schedule.num_timesteps)
    per_batch = len(samplers.plan(plan.sampler, model.schedule, request.steps).timesteps)
    if is_img2img:
        per_batch = max(1, min(per_batch, int(strength * per_batch)))
    progress.steps = per_batch * request.n_iter
    _, amp = generation_precision(precision, models.device)
    autocast = torch.autocast(models.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    eta = request.eta if plan.sampler == "ddim" and request.eta is not None else 0.0
    images, interrupted = [], False
    for iteration in range(request.n_iter):
        progress.text = f"batch {iteration + 1} of {request.n_iter}"
        progress.job.skipped.clear()  # a skip that came between batches is spent, as in A1111
        latest: dict[str, torch.Tensor] = {}

        def callback(state: dict) -> None:
            latest["x0"] = x0 = state["x0"]
            progress.step(preview=lambda: _decode(model, x0[:1])[0])

        seed = plan.seed + iteration * request.batch_size
        try:
            progress.check()
            with autocast:
                images += model.generate(plan.prompt, negative_prompt=request.negative_prompt or None,
                                         steps=request.steps, sampler=plan.sampler, guidance_scale=request.cfg_scale,
                                         eta=eta, seed=seed, n_samples=request.batch_size,
                                         batch_size=request.batch_size, height=sample_height, width=sample_width,
                                         init_image=plan.init_image, strength=strength, mask=plan.mask,
                                         callback=callback)
        except Interrupted as stop:
            if "x0" in latest:  # A1111: the batch's latest denoised estimate
                for k, image in enumerate(_decode(model, latest["x0"])):
                    image.info.update(prompt=plan.prompt, negative_prompt=request.negative_prompt, seed=seed + k)
                    images.append(image)
            if isinstance(stop, Skipped):
                progress.done = per_batch * (iteration + 1)
                continue
            interrupted = True
            break
    return _response(plan, model, models, images, (width, height), (sample_width, sample_height), lora_hashes,
                     interrupted=interrupted, outdir=outdir)


@torch.inference_mode()
def _decode(model, latents: torch.Tensor) -> list[Image.Image]:
    dtype = next(model.autoencoder.parameters()).dtype
    return [Image.fromarray(a) for a in to_uint8(model.decode_latents(latents.to(dtype)))]


def _response(plan, model, models, images, size, sampled, lora_hashes, *, interrupted, outdir) -> dict[str, Any]:
    request = plan.request
    width, height = size
    checkpoint = models.current
    params = {"steps": request.steps, "sampler": A1111_NAMES[plan.sampler], "scale": request.cfg_scale,
              "width": width, "height": height, "model_hash": checkpoint.shorthash}
    if plan.init_image is not None:
        params["strength"] = request.denoising_strength
    if lora_hashes:
        params["lora_hashes"] = lora_hashes
    if sampled != size:
        params["sampled_width"], params["sampled_height"] = sampled
    encoded, infotexts = [], []
    for image in images:
        if image.size != size:
            info, image = image.info, image.resize(size, Image.LANCZOS)
            image.info.update(info)
        image_params = with_ti_hashes(model, image, params)
        data = png_bytes(image, png_info(image, image_params))
        infotexts.append(parameters_text(image, image_params))
        if request.send_images:
            encoded.append(base64.b64encode(data).decode("ascii"))
        if request.save_images and outdir is not None:
            (outdir / "samples").mkdir(parents=True, exist_ok=True)
            save_numbered(outdir / "samples", "{:05d}.png", 0, data)
    seeds = [image.info["seed"] for image in images]
    info = {"prompt": request.prompt, "all_prompts": [request.prompt] * len(images),
            "negative_prompt": request.negative_prompt, "all_negative_prompts": [request.negative_prompt] * len(images),
            "seed": plan.seed, "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(images),
            "subseed_strength": 0, "width": width, "height": height, "sampler_name": params["sampler"],
            "cfg_scale": request.cfg_scale, "steps": request.steps, "batch_size": request.batch_size,
            "restore_faces": False, "face_restoration_model": None, "sd_model_name": checkpoint.model_name,
            "sd_model_hash": checkpoint.shorthash, "sd_vae_name": None, "sd_vae_hash": None,
            "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": request.denoising_strength if plan.init_image is not None else None,
            "extra_generation_params": {k: v for k, v in params.items() if k in ("lora_hashes", "sampled_width",
                                                                                 "sampled_height")},
            "index_of_first_image": 0, "infotexts": infotexts, "styles": request.styles,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
            "is_using_inpainting_conditioning": bool(model.concat_channels), "version": VERSION,
            "interrupted": interrupted, "ignored_settings": plan.ignored_settings}
    parameters = request.model_dump()
    if isinstance(request, Img2ImgRequest) and not request.include_init_images:
        parameters.update(init_images=None, mask=None)  # A1111 leaves the (large) inputs out of the echo
    return {"images": encoded, "parameters": parameters, "info": json.dumps(info)}


def png_info_response(data: str) -> dict[str, Any]:
    """POST /sdapi/v1/png-info: the "parameters" text, the other text chunks, and the parameters parsed."""
    image = decode_image(data, "image")
    items = {k: v for k, v in image.info.items() if isinstance(v, str)}
    text = items.pop("parameters", "")
    return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}
