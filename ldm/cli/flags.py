"""The command lines' flags and their checks, answered before torch or a model loads: txt2img.py's and
img2img.py's generation flags, their prompts and LoRA requests (`ldm.cli.generate` runs them), and
train_ldm.py's LoRA flags. Light on purpose: `--help` and a bad flag never wait for torch.
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from common.choices import ATTENTION_BACKENDS, SAMPLER_NAMES, TIMESTEP_SPACINGS
from common.errors import InputError

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
    # DPM-Solver++ 2M with Karras sigmas at 20 steps is 3.6x closer to the exact solution than DDIM at 50
    # (bench/RESULTS.md, sampler_accuracy) in 2.5x fewer denoiser calls; --sampler ddim --steps 50 is the
    # original scripts' choice.
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--sampler", default="dpmpp_2m_karras", choices=SAMPLER_NAMES, help="sampler")
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
                   help="auto: bf16 autocast on CUDA, bf16 denoiser weights on CPUs with native bf16 (AVX-512 "
                        "BF16, AMX), fp32 elsewhere")
    p.add_argument("--attention", default="sdpa", choices=ATTENTION_BACKENDS, help="attention implementation")
    p.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True,
                   help="also save a grid of each run's images")
    p.add_argument("--vae-tiling", action="store_true", help="decode (and encode) in tiles: large images, less memory")
    p.add_argument("--channels-last", action="store_true",
                   help="lay the UNet and autoencoder out channels-last (faster convs on most CPUs and GPUs)")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                   help="torch.compile the denoiser (fuses GroupNorm+SiLU and friends; the first image pays "
                        "the compile time, about 1.5 min on 2 CPU cores for the default model); "
                        "'--compile reduce-overhead' also replays each step as a CUDA graph on CUDA")
    p.add_argument("--deep-cache", type=int, default=1, metavar="N",
                   help="step caching (DeepCache): the UNet's deep features are computed every N denoiser calls and "
                        "reused in between (N 2-3: about 1.8-2.4x faster, a small quality cost; 1: off)")
    p.add_argument("--fuse-qkv", action="store_true",
                   help="compute each attention layer's Q, K, V with one matrix multiply (fewer kernel launches)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="a LoRA file merged into the model (kohya, LoCon, PEFT), at WEIGHT (default 1); repeatable")
    p.add_argument("--lora-dir", default=None,
                   help="the folder where <lora:NAME:WEIGHT> in a prompt finds NAME.safetensors (A1111's syntax)")
    p.add_argument("--embeddings-dir", default=None,
                   help="a folder of textual-inversion embeddings (A1111 .pt / .safetensors, diffusers); a file's "
                        "name is its token in prompts")
    p.add_argument("--timestep-spacing", default=None, choices=TIMESTEP_SPACINGS,
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
    if getattr(args, "deep_cache", 1) < 1:
        raise InputError(f"--deep-cache must be >= 1 (1: off), got {args.deep_cache}")
    if getattr(args, "deep_cache", 1) > 1 and getattr(args, "compile", None):
        raise InputError("--deep-cache runs the UNet's blocks itself, so it does not combine with --compile; "
                         "choose one")
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


def add_lora_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """train_ldm.py's options for starting from a full model and training LoRA adapters on it."""
    parser.add_argument("--init", default=None, metavar="PATH",
                        help="start from this model (our checkpoint, an SD .ckpt/.safetensors, a diffusers folder; "
                             "'default': the embedded default model) instead of the config's model section")
    parser.add_argument("--lora-rank", type=int, default=None, metavar="R",
                        help="freeze the model and train rank-R LoRA adapters on the UNet's attention and "
                             "feed-forward projections; saves OUT/lora.safetensors (kohya format)")
    parser.add_argument("--lora-alpha", type=float, default=None, metavar="A",
                        help="LoRA alpha: the update is scaled by A / R (default: R, scale 1)")
    parser.add_argument("--lora-text-encoder", action="store_true",
                        help="also train LoRA adapters on the text encoder's attention and MLP projections")
    return parser


def check_lora_arguments(args: argparse.Namespace) -> None:
    """The LoRA options' combinations: alpha and --lora-text-encoder need --lora-rank."""
    if args.lora_rank is None:
        if args.lora_alpha is not None or args.lora_text_encoder:
            raise InputError("--lora-alpha and --lora-text-encoder go with --lora-rank R")
        return
    if args.lora_rank < 1:
        raise InputError(f"--lora-rank must be a whole number >= 1, got {args.lora_rank}")
    if args.lora_alpha is None:
        args.lora_alpha = float(args.lora_rank)
