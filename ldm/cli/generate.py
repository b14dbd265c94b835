"""What txt2img.py and img2img.py share: flags, loading, the generation loop, numbered PNGs with metadata."""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
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
from ldm import samplers
from ldm.cli import autocast_dtype, pick_device
from ldm.denoisers.attention import BACKENDS, set_attention_backend
from ldm.formats.loading import DEFAULT_MODEL, load_model
from ldm.images import make_grid
from ldm.model import LatentDiffusion
from ldm.pipeline import LAST_SEED, resolve_size
from ldm.text.embeddings import load_embeddings

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's modes
# The images of one iteration (prompts x --n_samples) are held in memory until written; beyond this many a run
# is refused before the model loads (`check_memory` then bounds the rest by the memory they need).
MAX_SAMPLES = 100_000


def add_generation_args(p: argparse.ArgumentParser, *, outdir: str) -> None:
    """The flags of the Stable Diffusion scripts that both commands take."""
    p.add_argument("--prompt", default=None, help="what to draw")
    p.add_argument("--from-file", default=None, help="a text file with one prompt per line")
    p.add_argument("--negative_prompt", default="", help="what to steer away from (the unconditional side)")
    p.add_argument("--outdir", default=outdir, help="folder for the images (never overwritten)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--sampler", default="ddim", choices=list(samplers.SAMPLERS), help="sampler")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale (1: no guidance)")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--n_samples", type=int, default=1, help="images per prompt in each iteration")
    p.add_argument("--n_iter", type=int, default=1, help="iterations")
    p.add_argument("--batch_size", type=int, default=4, help="most images sampled at once")
    p.add_argument("--seed", type=int, default=42, help="seed of the first image; image k uses seed + k")
    p.add_argument("--ckpt", default=None, help="checkpoint (.safetensors or .ckpt); default: the embedded model")
    p.add_argument("--config", default=None, help="original-style YAML for an original-format checkpoint")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="autocast precision (auto: bf16 on CUDA, fp32 elsewhere)")
    p.add_argument("--attention", default="sdpa", choices=BACKENDS, help="attention implementation")
    p.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True,
                   help="also save a grid of each run's images")
    p.add_argument("--vae-tiling", action="store_true", help="decode (and encode) in tiles: large images, less memory")
    p.add_argument("--channels-last", action="store_true",
                   help="lay the UNet and autoencoder out channels-last (faster convs on most CPUs and GPUs)")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                   help="torch.compile the denoiser (fuses GroupNorm+SiLU and friends; the first image pays "
                        "the compile time, about 1.5 min on 2 CPU cores for the default model); "
                        "'--compile reduce-overhead' also replays each step as a CUDA graph on CUDA")
    p.add_argument("--fuse-qkv", action="store_true",
                   help="compute each attention layer's Q, K, V with one matrix multiply (fewer kernel launches)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="a LoRA file merged into the model (kohya, LoCon, PEFT), at WEIGHT (default 1); repeatable")
    p.add_argument("--lora-dir", default=None,
                   help="the folder where <lora:NAME:WEIGHT> in a prompt finds NAME.safetensors (A1111's syntax)")
    p.add_argument("--embeddings-dir", default=None,
                   help="a folder of textual-inversion embeddings (A1111 .pt / .safetensors, diffusers); a file's "
                        "name is its token in prompts")
    p.add_argument("--timestep-spacing", default=None, choices=list(samplers.SPACINGS),
                   help="which timesteps the sampler visits (diffusers' names, or sgm's); default: the model's "
                        "(sgm's for SDXL), else each sampler's own")
    p.add_argument("--original-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="SDXL micro-conditioning: the size the image is meant to come from (default: the output size)")
    p.add_argument("--crop", type=int, nargs=2, default=(0, 0), metavar=("TOP", "LEFT"),
                   help="SDXL micro-conditioning: the crop's top-left corner")
    p.add_argument("--target-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="SDXL micro-conditioning: the target size (default: the output size)")
    p.add_argument("--aesthetic-score", type=float, default=None,
                   help="SDXL refiner micro-conditioning (default 6.0; 2.5 on the negative side)")


LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")  # A1111: <lora:NAME[:WEIGHT[:...]]>
LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


def lora_requests(args: argparse.Namespace, prompts: list[str]) -> tuple[list[str], list[tuple[Path, float]]]:
    """(the prompts without their <lora:...> tags, [(file, weight)] from --lora and the tags), checked up front.

    As in A1111, a tag applies its LoRA to the whole run and is removed from the text; its NAME is a file in
    --lora-dir (with or without the suffix). `--lora FILE:WEIGHT` splits at the last colon when what follows is
    a number (so C:\\ paths work)."""
    requests: list[tuple[Path, float]] = []
    for spec in args.lora:
        path, _, weight = spec.rpartition(":")
        if not path or not _is_number(weight):
            path, weight = spec, "1"
        requests.append((Path(path), float(weight)))
    tagged: dict[str, float] = {}
    for prompt in prompts:
        for name, weight in LORA_TAG.findall(prompt):
            weight = weight.strip() or "1"
            if not _is_number(weight):
                raise InputError(f"<lora:{name}:{weight}>: the weight must be a number, e.g. <lora:{name}:0.8>")
            if tagged.get(name, float(weight)) != float(weight):
                raise InputError(f"<lora:{name}> is given with two weights ({tagged[name]} and {weight}) in one run; "
                                 "use one weight, or run the prompts separately")
            tagged[name] = float(weight)
    if tagged and args.lora_dir is None:
        raise InputError(f"the prompt names <lora:{next(iter(tagged))}>: give --lora-dir, the folder of LoRA files")
    for name, weight in tagged.items():
        folder = Path(args.lora_dir)
        found = next((c for c in (folder / name, *(folder / (name + s) for s in LORA_SUFFIXES)) if c.is_file()), None)
        if found is None:
            raise InputError(f"<lora:{name}>: no {name}.safetensors (or .ckpt / .pt) in --lora-dir {folder}")
        requests.append((found, weight))
    for path, weight in requests:
        if not path.is_file():
            raise InputError(f"LoRA file not found: {path}")
        if not math.isfinite(weight):
            raise InputError(f"LoRA weight must be a finite number, got {weight} for {path}")
    cleaned = [re.sub(r"\s{2,}", " ", LORA_TAG.sub("", p)).strip() for p in prompts]
    return cleaned, requests


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def apply_loras(model: LatentDiffusion, requests: list[tuple[Path, float]]) -> str | None:
    """Merge each requested LoRA (printing its report); the "Lora hashes" value for the PNG parameters."""
    hashes = []
    for path, weight in requests:
        print(model.load_lora(path, weight))
        hashes.append(f"{path.stem}: {model_hash(path)}")
    return ", ".join(hashes) or None


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts, without their <lora:...> tags; the LoRAs to merge (--lora and the tags, checked now) are kept
    in `args.lora_requests` for `load_for_generation`."""
    if (args.prompt is None) == (args.from_file is None):
        raise InputError("give either --prompt or --from-file")
    if args.prompt is not None:
        prompts = [args.prompt]
    else:
        path = Path(args.from_file)
        if not path.is_file():
            raise InputError(f"prompt file not found: {path}")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise InputError(f"prompt file {path} has no prompts (one per line)")
    prompts, args.lora_requests = lora_requests(args, prompts)
    return prompts


def check_generation_args(args: argparse.Namespace) -> None:
    for flag in ("scale", "ddim_eta", "strength"):  # argparse's float() takes "nan" and "inf"
        value = getattr(args, flag, None)
        if value is not None and not math.isfinite(value):
            raise InputError(f"--{flag} must be a finite number, got {value}")
    if args.steps < 1:
        raise InputError(f"--steps must be >= 1, got {args.steps}")
    if args.scale < 0:
        raise InputError(f"--scale must be >= 0, got {args.scale}")
    if not 0 <= args.ddim_eta <= 1:
        raise InputError(f"--ddim_eta must be in [0, 1], got {args.ddim_eta}")
    for name in ("n_samples", "n_iter", "batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.n_samples > MAX_SAMPLES:
        raise InputError(f"--n_samples must be at most {MAX_SAMPLES} (the images of one iteration are held in memory "
                         f"until written), got {args.n_samples}; use --n_iter for more images")
    for flag in ("H", "W"):  # None: the model's (or the init image's) size
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            raise InputError(f"--{flag} must be a positive number of pixels, got {getattr(args, flag)}; leave it out "
                             "for the model's native size")
    for flag, low in (("original_size", 1), ("crop", 0), ("target_size", 1)):
        value = getattr(args, flag, None)
        if value is not None and min(value) < low:
            raise InputError(f"--{flag.replace('_', '-')} takes two whole numbers >= {low}, got {list(value)}")
    for flag in ("aesthetic_score", "refiner_switch"):
        value = getattr(args, flag, None)
        if value is not None and not math.isfinite(value):
            raise InputError(f"--{flag.replace('_', '-')} must be a finite number, got {value}")
    if getattr(args, "refiner", None) is not None and not 0 < args.refiner_switch < 1:
        raise InputError(f"--refiner-switch must be between 0 and 1 (the share of the noise levels the base runs), "
                         f"got {args.refiner_switch}")
    if args.seed is not None and not 0 <= args.seed <= 2 ** 63 - 1:
        raise InputError(f"--seed must be a whole number from 0 to 2**63 - 1, got {args.seed}")
    check_output_folder(Path(args.outdir))


def check_output_folder(outdir: Path) -> None:
    """Before the model loads: `outdir` and `outdir/samples` are folders (or can be made) we may write in."""
    from ldm.cli import check_output_folder as check_folder
    check_folder(outdir, flag="--outdir", what="the images", subfolders={"samples": "the images"})


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
    autocast_dtype(args.precision, device)  # fail early on a precision the device cannot do
    set_attention_backend(args.attention)
    path = Path(args.ckpt) if args.ckpt else DEFAULT_MODEL
    model = load_model(args.ckpt, config=args.config, device=device)
    missing = [name for name in ("denoiser", "text_encoder") if getattr(model, name) is None]
    if missing:
        raise InputError(f"{path} has no {' and no '.join(missing)}: text-to-image needs a full latent diffusion model")
    if args.embeddings_dir is not None:
        print(load_embeddings(model.text_encoder, args.embeddings_dir).describe())
    args.lora_hashes = apply_loras(model, getattr(args, "lora_requests", []))
    if args.vae_tiling:
        model.autoencoder.enable_tiling()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.fuse_qkv:
        model.fuse_qkv_projections()
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


# img2img's settings in the "parameters" line (A1111's names; its img2img writes "Denoising strength").
IMG2IMG_LABELS = {"strength": "Denoising strength", "init_image": "Init image", "mask": "Mask",
                  "lora_hashes": "Lora hashes"}  # and A1111's record of the LoRAs used


def png_info(image: Image.Image, params: dict[str, Any]) -> PngImagePlugin.PngInfo:
    """A "parameters" text chunk in the layout other SD tools read (`parameters_text`), plus the full record
    as JSON."""
    record = {"prompt": image.info["prompt"], "negative_prompt": image.info["negative_prompt"],
              "seed": image.info["seed"], **params}
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters_text(image, params))
    info.add_text("ldm", json.dumps(record, sort_keys=True))
    return info


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
    amp = autocast_dtype(args.precision, device)
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
                      **recorded_options(args)}
            for image in images:  # numbered on from `index`, past any name another process took meanwhile
                path, index = save_numbered(sample_dir, "{:05d}.png", index, png_bytes(image, png_info(image, params)))
                written.append(path)
                index += 1
            if args.grid and len(images) > 1:
                grid = make_grid(images, columns=args.n_samples if len(prompts) > 1 else min(len(images), 4))
                # The grid carries its first image's parameters, as A1111's grids do.
                grid_path, _ = save_numbered(outdir, "grid-{:04d}.png", next_index(outdir, r"grid-(\d+)\.png"),
                                             png_bytes(grid, png_info(images[0], params)))
                written.append(grid_path)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    print(f"wrote {total_images} image{'s' if total_images != 1 else ''} to {sample_dir}" + (f" and grids to {outdir}" if args.grid and total_images > 1 else "")
          + f"; {seconds / total_images:.2f} s per image")
    return written


