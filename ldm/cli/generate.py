"""What txt2img.py and img2img.py share: loading, the generation loop, numbered PNGs with metadata (their flags,
checked before anything heavy loads, are in `ldm.cli.flags`)."""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin
from tqdm import tqdm

from common.errors import InputError
from ldm import lora as _lora  # noqa: F401  (attaches LatentDiffusion.load_lora: apply_loras)
from ldm import samplers
from ldm.cli import cast_for_cpu_bf16, generation_precision, pick_device
from ldm.cli.flags import COMPILE_MODES as COMPILE_MODES  # the flags live there (light); named here too
from ldm.cli.flags import LORA_SUFFIXES as LORA_SUFFIXES
from ldm.cli.flags import MAX_SAMPLES as MAX_SAMPLES
from ldm.cli.flags import add_generation_args as add_generation_args
from ldm.cli.flags import check_generation_args as check_generation_args
from ldm.cli.flags import lora_requests as lora_requests
from ldm.cli.flags import read_prompts as read_prompts
from ldm.denoisers.attention import set_attention_backend
from ldm.formats.loading import DEFAULT_MODEL, load_model
from ldm.images import make_grid
from ldm.model import LatentDiffusion
from ldm.pipeline import LAST_SEED, resolve_size
from ldm.text.embeddings import load_embeddings
from ldm.text.prompts import used_embeddings


def apply_loras(model: LatentDiffusion, requests: list[tuple[Path, float]]) -> str | None:
    """Merge each requested LoRA (printing its report); the "Lora hashes" value for the PNG parameters."""
    hashes = []
    for path, weight in requests:
        print(model.load_lora(path, weight))
        hashes.append(f"{path.stem}: {model_hash(path)}")
    return ", ".join(hashes) or None


def model_hash(path: Path) -> str:
    """The first 10 hex digits of the file's SHA-256 (the "Model hash" other tools print)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def load_for_generation(args: argparse.Namespace) -> tuple[LatentDiffusion, torch.device, str]:
    """The model on its device, attention and tiling set; and its hash."""
    device = pick_device(args.device)
    generation_precision(args.precision, device)  # fails early on a precision the device cannot do
    set_attention_backend(args.attention)
    path = Path(args.ckpt) if args.ckpt else DEFAULT_MODEL
    model = load_model(args.ckpt, config=args.config, device=device)
    missing = [name for name in ("denoiser", "text_encoder") if getattr(model, name) is None]
    if missing:
        raise InputError(f"{path} has no {' and no '.join(missing)}: text-to-image needs a full latent diffusion model")
    if args.embeddings_dir is not None:
        print(load_embeddings(model.text_encoder, args.embeddings_dir).describe())
    args.lora_hashes = apply_loras(model, getattr(args, "lora_requests", []))
    precision, _ = generation_precision(args.precision, device, model)
    if precision == "bf16" and device.type == "cpu":
        cast_for_cpu_bf16(model)
    if args.vae_tiling:
        model.autoencoder.enable_tiling()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.fuse_qkv:
        model.fuse_qkv_projections()
    if getattr(args, "deep_cache", 1) > 1:
        from ldm.denoisers.deep_cache import enable_deep_cache
        enable_deep_cache(model, args.deep_cache)
    if args.compile:
        compile_denoiser(model, args.compile)
    return model, device, model_hash(path)


def compile_denoiser(model: LatentDiffusion, mode: str = "default") -> None:
    """`torch.compile` the denoiser in place (its state_dict keys stay as they are); compiles at the first call.

    mode "reduce-overhead" records CUDA graphs on CUDA (a no-op on the CPU). A replayed graph writes
    its output into the same buffer each time, and samplers keep past outputs (PLMS, DPM-Solver++
    2M), so every call starts a new graph step and hands back a copy of the output.
    """
    if mode not in COMPILE_MODES:
        raise InputError(f"compile mode {mode!r} is unknown; choose one of {list(COMPILE_MODES)}")
    denoiser = model.denoiser
    device = next(denoiser.parameters()).device
    compilers = {os.environ.get("CXX", "g++"), "g++", "c++", "clang++"}  # inductor's CPU backend builds C++
    if device.type == "cpu" and not any(shutil.which(c) for c in compilers):
        raise InputError("--compile on the CPU needs a C++ compiler (install g++, e.g. apt install g++); "
                         "or leave --compile off")
    if mode != "reduce-overhead":
        denoiser.compile(mode=mode)
        return
    compiled = torch.compile(denoiser.forward, mode=mode)

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs).clone()

    denoiser.forward = forward


def next_index(folder: Path, pattern: str) -> int:
    """One past the highest number among files named like `pattern` (e.g. r"(\\d+)\\.png")."""
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := re.fullmatch(pattern, p.name))] if folder.is_dir() else []
    return max(numbers, default=-1) + 1


def save_numbered(folder: Path, name: str, first: int, data: bytes) -> tuple[Path, int]:
    """Write `data` to a new file `name.format(n)` for the first free n >= `first`; (path, n).

    Never replaces a file, even with other processes writing to the folder at the same time: the name is
    claimed by an exclusive create (a name already taken moves on to n + 1), and the data goes to a hidden
    temporary file in the same folder that is then renamed onto the claimed name, so a reader never sees a
    partial file and an error leaves neither file behind.
    """
    n = first
    while True:
        path = folder / name.format(n)
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            n += 1
    temporary = folder / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        with open(temporary, "xb") as f:
            f.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        raise
    return path, n


def png_bytes(image: Image.Image, pnginfo: PngImagePlugin.PngInfo | None = None) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=pnginfo)
    return buffer.getvalue()


# img2img's settings in the "parameters" line (A1111's names; its img2img writes "Denoising strength"),
# and A1111's record of the LoRAs and textual-inversion embeddings used ("name: shorthash, ...").
IMG2IMG_LABELS = {"strength": "Denoising strength", "init_image": "Init image", "mask": "Mask",
                  "lora_hashes": "Lora hashes", "ti_hashes": "TI hashes"}


def png_info(image: Image.Image, params: dict[str, Any]) -> PngImagePlugin.PngInfo:
    """A "parameters" text chunk in the layout other SD tools read (`parameters_text`), plus the full record
    as JSON."""
    record = {"prompt": image.info["prompt"], "negative_prompt": image.info["negative_prompt"],
              "seed": image.info["seed"], **params}
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters_text(image, params))
    info.add_text("ldm", json.dumps(record, sort_keys=True))
    return info


def with_ti_hashes(model: LatentDiffusion, image: Image.Image, params: dict[str, Any]) -> dict[str, Any]:
    """`params` plus "ti_hashes" (A1111's "TI hashes": "name: shorthash, ...") of the textual-inversion embeddings
    that the image's prompt or negative prompt names; `params` itself when they name none."""
    prompts = [image.info["prompt"], image.info.get("negative_prompt") or ""]
    used = used_embeddings(model.text_encoder, prompts) if model.text_encoder is not None else {}
    return {**params, "ti_hashes": ", ".join(f"{name}: {digest}" for name, digest in used.items())} if used else params


def parameters_text(image: Image.Image, params: dict[str, Any]) -> str:
    """A1111's "parameters" text for an image from `generate` (its .info has the prompt and seed): the prompt,
    "Negative prompt: ..." (left out when empty, as A1111 does), then "Steps: ..., Sampler: ..., ...". img2img's strength, init image and mask
    (file names as given) and the LoRA hashes end the line when `params` has them."""
    negative = f"Negative prompt: {image.info['negative_prompt']}\n" if image.info["negative_prompt"] else ""
    text = (f"{image.info['prompt']}\n{negative}"
            f"Steps: {params['steps']}, Sampler: {params['sampler']}, CFG scale: {params['scale']}, "
            f"Seed: {image.info['seed']}, Size: {params['width']}x{params['height']}, "
            f"Model hash: {params['model_hash']}")
    for key, label in IMG2IMG_LABELS.items():
        if params.get(key) is not None:
            value = str(params[key])
            if any(c in value for c in ',:"\n'):  # would break the "key: value, ..." line: quoted, as A1111 does
                value = json.dumps(value)
            text += f", {label}: {value}"
    return text


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """`generate`'s keyword arguments from the timestep-spacing and SDXL micro-conditioning flags."""
    return {"timestep_spacing": args.timestep_spacing, "crop": tuple(args.crop),
            "original_size": None if args.original_size is None else tuple(args.original_size),
            "target_size": None if args.target_size is None else tuple(args.target_size),
            "aesthetic_score": args.aesthetic_score}


def recorded_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `sampling_options` a PNG records: those set on the command line (not None, a crop other than 0, 0)."""
    options = {k: v for k, v in sampling_options(args).items() if v is not None}
    if options["crop"] == (0, 0):
        del options["crop"]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def run(args: argparse.Namespace, model: LatentDiffusion, device: torch.device, digest: str, prompts: list[str],
        extra: dict[str, Any], *, record: dict[str, Any] | None = None) -> list[Path]:
    """Generate `n_iter` x prompts x `n_samples` images; write numbered PNGs (and grids); report.

    `extra` goes to `generate` (its numbers and strings also into each PNG's metadata); `record` only into the
    metadata (img2img: the init image and mask file names as given; None values are left out)."""
    outdir = Path(args.outdir)
    sample_dir = outdir / "samples"
    _, amp = generation_precision(args.precision, device)
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    per_iter = len(prompts) * args.n_samples
    total_images = per_iter * args.n_iter
    written: list[Path] = []
    # --steps against this model's training steps before `plan` uses it (the flags were checked without the model)
    samplers.check_sampler_args(args.sampler, args.steps, model.schedule.num_timesteps, eta=args.ddim_eta)
    steps_run = len(samplers.plan(args.sampler, model.schedule, args.steps).timesteps)
    if extra.get("init_image") is not None:
        steps_run = max(1, min(steps_run, int(extra["strength"] * steps_run)))
    # Before the bar starts: the size, then the memory of the batch sampled at once and of the images held
    resolve_size(model, extra.get("height"), extra.get("width"), extra.get("init_image"), dtype=amp,
                 batch_size=min(args.batch_size, per_iter), n_images=per_iter)
    if args.seed + total_images - 1 > LAST_SEED:
        raise InputError(f"--seed {args.seed} is too large for {total_images} images (image k uses seed + k, up to "
                         f"2**63 - 1): use at most {LAST_SEED - total_images + 1}")
    sample_dir.mkdir(parents=True, exist_ok=True)  # after the checks: a refused run leaves no folder behind
    batches = args.n_iter * -(-per_iter // args.batch_size)
    bar = tqdm(total=batches * steps_run, desc=f"sampling {total_images} images", unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    try:  # close the bar on errors too, so that an error message starts on a line of its own
        for iteration in range(args.n_iter):
            with autocast:
                images = model.generate(prompts, negative_prompt=args.negative_prompt or None, steps=args.steps,
                                        sampler=args.sampler, guidance_scale=args.scale, eta=args.ddim_eta,
                                        seed=args.seed + iteration * per_iter, n_samples=args.n_samples,
                                        batch_size=args.batch_size, callback=lambda _: bar.update(1),
                                        **sampling_options(args), **extra)
            index = next_index(sample_dir, r"(\d+)\.png")
            width, height = images[0].size
            params = {"steps": args.steps, "sampler": args.sampler, "scale": args.scale, "eta": args.ddim_eta,
                      "width": width, "height": height, "model_hash": digest,
                      **{k: v for k, v in extra.items() if isinstance(v, (int, float, str))},
                      **{k: v for k, v in (record or {}).items() if v is not None},
                      **({"lora_hashes": args.lora_hashes} if getattr(args, "lora_hashes", None) else {}),
                      **({"deep_cache": args.deep_cache} if getattr(args, "deep_cache", 1) > 1 else {}),
                      **recorded_options(args)}
            for image in images:  # numbered on from `index`, past any name another process took meanwhile
                data = png_bytes(image, png_info(image, with_ti_hashes(model, image, params)))
                path, index = save_numbered(sample_dir, "{:05d}.png", index, data)
                written.append(path)
                index += 1
            if args.grid and len(images) > 1:
                grid = make_grid(images, columns=args.n_samples if len(prompts) > 1 else min(len(images), 4))
                # The grid carries its first image's parameters, as A1111's grids do.
                grid_path, _ = save_numbered(outdir, "grid-{:04d}.png", next_index(outdir, r"grid-(\d+)\.png"),
                                             png_bytes(grid, png_info(images[0], with_ti_hashes(model, images[0],
                                                                                                params))))
                written.append(grid_path)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    print(f"wrote {total_images} image{'s' if total_images != 1 else ''} to {sample_dir}" + (f" and grids to {outdir}" if args.grid and total_images > 1 else "")
          + f"; {seconds / total_images:.2f} s per image")
    return written


