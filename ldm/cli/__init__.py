"""Small helpers shared by the command lines in tools/: overrides, device choice, clean errors."""
from __future__ import annotations

import argparse
import atexit
import gc
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import yaml
from tqdm import tqdm

from common.errors import InputError
from common.hardware import cpu_has_native_bf16
from common.lazy import LazyModule

torch = LazyModule("torch")  # imported at the first use: a tool's --help and its flag checks never load it


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) to a nested config dict, in place.

    Sections must exist; keys are checked by the typed config that reads the section."""
    for item in overrides:
        if "=" not in item:
            raise InputError(f"override {item!r} must look like section.key=value, e.g. train.batch_size=8")
        dotted, text = item.split("=", 1)
        keys = dotted.split(".")
        node = config
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                raise InputError(f"override {item!r}: no section {key!r} in the config (sections: {sorted(node)})")
            node = node[key]
        # A key the YAML leaves out may be set; the typed config then refuses unknown names.
        node[keys[-1]] = yaml.safe_load(text)
    return config


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every tool's --help: the description (the module docstring) keeps its line breaks, and each
    option shows its default: a real one only (not None, nor the False of a switch), and only where
    the help text does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS \
                or "default:" in text:
            return text
        return super()._get_help_string(action)


def check_output_folder(folder: str | Path, *, flag: str = "--outdir", what: str = "the output files",
                        subfolders: dict[str, str] | None = None) -> None:
    """Before any model or data loads: `folder` and its `subfolders` ({name: what goes there}) are folders,
    or can be made, that we may write in. Otherwise an InputError: the path, the problem and the fix."""
    folder = Path(folder)
    targets = {folder: what, **{folder / name: contents for name, contents in (subfolders or {}).items()}}
    for path, contents in targets.items():
        if path.exists() and not path.is_dir():
            raise InputError(f"{path} is a file, but {contents} go into a folder there: remove it or choose "
                             f"another {flag}")
    for path, contents in targets.items():
        _check_can_write_under(path, f"{contents} cannot be written to {folder}", f"choose another {flag}")


def check_output_file(path: str | Path, flag: str, *, what: str = "the output", fix: str | None = None) -> None:
    """Before any model or data loads: `path` names a file (not a folder) that we may write, in a folder
    that exists or can be made. Otherwise an InputError: the path, the problem and the fix (`fix`, by
    default "choose another FLAG")."""
    path = Path(path)
    fix = fix or f"choose another {flag}"
    if path.is_dir():
        raise InputError(f"{path} is a folder, but {what} is written to a file: give {flag} a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{path} is read-only, so {what} cannot be written to it: make it writable or {fix}")
    _check_can_write_under(path.parent, f"{what} cannot be written to {path}", fix)


def _check_can_write_under(path: Path, consequence: str, fix: str) -> None:
    """The nearest existing path on the way to folder `path` (itself or a parent) is a folder we may write in."""
    existing = next((p for p in (path, *path.parents) if os.path.lexists(p)), None)
    if existing is None:  # only if "." or "/" is gone; the write itself will say what is wrong
        return
    if not existing.exists():
        raise InputError(f"{existing} is a broken link, so {consequence}: remove it or {fix}")
    if not existing.is_dir():
        raise InputError(f"{existing} is a file, so {consequence}: {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{existing} is not writable, so {consequence}: {fix}")


def training_parser(description: str, *, config: str, config_help: str, data_help: str, data_required: bool,
                    other_input: tuple[str, str], out_help: str, devices: str,
                    override_example: str) -> argparse.ArgumentParser:
    """The trainers' command line: --config, --data, one more input of the tool's (`other_input`: flag, help;
    default None), --out, --max-steps, --resume, --device and the `section.key=value` overrides."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--config", default=config, help=config_help)
    p.add_argument("--data", default=None, required=data_required, help=data_help)
    p.add_argument(other_input[0], default=None, help=other_input[1])
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--device", default="auto", help=devices)
    p.add_argument("overrides", nargs="*", help=f"config overrides section.key=value, e.g. {override_example}")
    return p


def require_counts(args: argparse.Namespace, *names: str) -> None:
    """InputError for a count option below 1 (`--batch-size 0`), named as on the command line."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {value}")


def pick_device(name: str = "auto") -> torch.device:
    """`auto` is cuda, then mps, then cpu; an unavailable device is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` (fp32 -> None); `auto` is bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise InputError(f"precision {precision!r} is not one of auto, fp32, bf16, fp16")
    if table[precision] is not None and device.type == "cpu":
        raise InputError(f"precision {precision} autocast is for GPUs; use fp32 on the CPU")
    return table[precision]


# On the CPU, `auto` picks bf16 for denoisers of at least this many parameters (SD's UNet has 860M): their
# matmuls are large enough to run at about twice the fp32 rate, while a small model's (the default model's
# UNet) gain little and pay the casts (bench/RESULTS.md, "bf16 on the CPU").
CPU_BF16_MIN_PARAMETERS = 100_000_000


def generation_precision(precision: str, device: torch.device,
                         model: torch.nn.Module | None = None) -> tuple[str, torch.dtype | None]:
    """(the precision generation runs at, its autocast dtype or None). GPUs autocast (`autocast_dtype`; auto:
    bf16 where supported). On the CPU, bf16 keeps the denoiser's weights in bf16 (`cast_for_cpu_bf16`: no
    autocast); `auto` picks it on CPUs that multiply bf16 natively (`common.hardware`) for a `model` whose
    denoiser is large (`CPU_BF16_MIN_PARAMETERS`), fp32 otherwise."""
    if device.type != "cpu":
        amp = autocast_dtype(precision, device)
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp], amp
    if precision == "auto":
        denoiser = getattr(model, "denoiser", None)
        large = denoiser is not None and sum(p.numel() for p in denoiser.parameters()) >= CPU_BF16_MIN_PARAMETERS
        precision = "bf16" if large and cpu_has_native_bf16() else "fp32"
    if precision == "fp16":
        raise InputError("precision fp16 is for GPUs (CPUs have no fast fp16 and it overflows); use bf16 or fp32")
    if precision not in ("fp32", "bf16"):
        raise InputError(f"precision {precision!r} is not one of auto, fp32, bf16, fp16")
    return precision, None


def cast_for_cpu_bf16(model: torch.nn.Module) -> None:
    """CPU bf16 inference: the denoiser's weights in bf16, where nearly all the time goes (its matmuls and
    convolutions run at about twice the fp32 rate on AVX-512 BF16 / AMX). Its GroupNorms compute in fp32
    (GroupNorm32) and SDPA accumulates in fp32; `LatentDiffusion.sample` casts the latent and the context
    to bf16 at each call and the output back, so the sampler's arithmetic stays fp32. The text encoder runs
    once per prompt and the VAE once per image: both stay fp32, which keeps the decoded pixels exact."""
    if model.denoiser is not None:
        model.denoiser.to(torch.bfloat16)


def run_cli(main: Callable[[], Any]) -> None:
    """Run `main`; bad input prints one line `error: ...` and exits 2, with no traceback. So does a full
    disk met by any write (the writers in common.checkpoint also remove their partial file and say how
    much space the write needed)."""
    warnings.showwarning = _show_warning
    try:
        main()
    except InputError as exc:
        _close_progress_bars()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except _torch_out_of_memory():
        _close_progress_bars()
        print("error: out of memory: use a smaller --n_samples / --batch_size, --vae-tiling, or a lower "
              "--precision (fp16 / bf16)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        from common.checkpoint import disk_full_path, is_disk_full
        if not is_disk_full(exc):
            raise
        where = disk_full_path(exc)
        _close_progress_bars()
        print(f"error: disk full{' at ' + str(where) if where else ''}: free space or choose another output folder",
              file=sys.stderr)
        sys.exit(2)


def end_without_final_collection() -> None:
    """Let this process end without Python's garbage collections at shutdown, which walk every object torch
    made (about 0.5 s on 2 CPU cores): at exit, the objects still alive are frozen (`gc.freeze`), so the
    collections skip them; the memory goes back to the system with the process. For a command whose files
    are all written and closed (txt2img and img2img call it once their images are saved): cyclic garbage
    left at exit is not finalized then."""
    atexit.unregister(gc.freeze)  # once, however often it is called in one process
    atexit.register(gc.freeze)


def _torch_out_of_memory() -> type[BaseException] | tuple[()]:
    """torch's OutOfMemoryError, or nothing to catch where torch was never imported (it ran out of nothing)."""
    return sys.modules["torch"].OutOfMemoryError if "torch" in sys.modules else ()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line `warning: ...` above any progress bar (tqdm.write redraws the bar below it),
    without the source line Python prints by default."""
    tqdm.write(f"warning: {message}", file=sys.stderr)


def _close_progress_bars() -> None:
    """End the open tqdm bars (a failure mid-loop leaves one), so an error line starts a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
