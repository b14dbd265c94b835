#!/usr/bin/env python
"""Convert checkpoints between the original (CompVis / Stability) format and ours, optionally to fp16.

    python tools/convert_checkpoint.py v1-5-pruned-emaonly.ckpt sd15.safetensors            # original -> ours
    python tools/convert_checkpoint.py model.ckpt model.safetensors --config v2-inference-v.yaml --half
    python tools/convert_checkpoint.py sd15.safetensors sd15-original.ckpt --to original     # ours -> original
    python tools/convert_checkpoint.py sd15.safetensors sd15-diffusers --to diffusers         # -> a diffusers folder
    python tools/convert_checkpoint.py runs/x/checkpoints/step_00000004 model.safetensors   # a training checkpoint

Ours: one .safetensors with the config in its metadata (loads with no config file). Original: a
.ckpt ({"state_dict": ...}) or .safetensors with the original key names and schedule buffers, plus
the original-style YAML written beside it (OUTPUT with .yaml). Each file is written atomically; on a full
disk nothing is left half-written (nor a checkpoint without its YAML) and the input is never touched.
diffusers: a folder (model_index.json, unet/, vae/, text_encoder/, ...) that diffusers' from_pretrained loads,
written into a temporary folder and renamed; INPUT may also be a diffusers folder.
A training checkpoint folder (tools/train_ldm.py's checkpoints/step_*, sharded by train.fsdp or not) gives its
EMA weights (--no-ema: the raw ones) with the rest of the model; a sharded one is gathered here, in one process
(its dcp/.metadata is a pickle, as PyTorch writes it: convert only training checkpoints you trust).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

import ldm
from ldm.cli import HelpFormatter, check_output_file, run_cli


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("input", metavar="INPUT",
                   help="checkpoint to read (.safetensors or .ckpt, ours or original, a diffusers folder, or a "
                        "training checkpoint folder, checkpoints/step_*)")
    p.add_argument("output", metavar="OUTPUT",
                   help="file to write (.safetensors or .ckpt; a new folder for --to diffusers)")
    p.add_argument("--to", choices=("ours", "original", "diffusers"), default="ours", help="format to write")
    p.add_argument("--config", default=None, help="original-style YAML for an original input (default: recognised)")
    p.add_argument("--parameterization", choices=("eps", "v"), default=None, help="override (SD 2.x base vs 768-v)")
    p.add_argument("--half", action="store_true", help="store the weights in float16")
    p.add_argument("--no-ema", action="store_true", help="keep the raw weights even if an EMA copy is present")
    args = p.parse_args()
    # torch and the model stack load only now: --help and bad flags answer without them
    from common.checkpoint import save_checkpoint, write_text_atomically
    from ldm.formats.diffusers import check_new_folder, write_diffusers_folder
    from ldm.formats.original_configs import to_original_config, to_original_state_dict

    output = Path(args.output)
    if output.resolve() == Path(args.input).resolve():
        raise ldm.InputError("output would overwrite the input; choose another file name")
    if args.to == "diffusers":  # a folder: the checks of the file inside it, made where OUTPUT will be
        check_new_folder(output)
        check_output_file(output / "model_index.json", "OUTPUT", what="the diffusers folder")
    else:
        check_output_file(output, "OUTPUT", what="the converted checkpoint")
    if args.to == "original":
        check_output_file(output.with_suffix(".yaml"), "OUTPUT", what="its original-style YAML")
    if args.to == "ours" and output.suffix != ".safetensors":
        raise ldm.InputError("our format is .safetensors; name the output *.safetensors")
    start = time.perf_counter()
    model = load_input(args)
    if args.half:
        model.half()  # the schedule stays float32 (LatentDiffusion._apply)
    if args.to == "ours":
        ldm.save_model(model, output)
    elif args.to == "diffusers":
        write_diffusers_folder(to_original_state_dict(model), to_original_config(model.config), output)
    else:
        config = to_original_config(model.config)
        save_checkpoint(output, to_original_state_dict(model), {}, ours=False)
        try:
            write_text_atomically(output.with_suffix(".yaml"), yaml.safe_dump(config, sort_keys=False))
        except BaseException:
            output.unlink(missing_ok=True)  # a checkpoint in the original layout is of no use without its YAML
            raise
        print(f"wrote the original-style config to {output.with_suffix('.yaml')}")
    n_params = sum(p.numel() for p in model.parameters())
    dtype = next(model.parameters()).dtype
    print(f"wrote {output} ({args.to} format, {n_params / 1e6:.1f}M parameters, {str(dtype).replace('torch.', '')}) "
          f"in {time.perf_counter() - start:.1f} s")


def load_input(args: argparse.Namespace) -> ldm.LatentDiffusion:
    """INPUT as a model; a training checkpoint folder through a temporary file of our format beside OUTPUT."""
    from common.checkpoint import save_checkpoint
    from ldm.training.sharded import is_training_checkpoint, read_training_checkpoint

    if not is_training_checkpoint(args.input):
        return ldm.load_model(args.input, config=args.config, parameterization=args.parameterization,
                              ema=not args.no_ema)
    tensors, metadata = read_training_checkpoint(args.input, ema=not args.no_ema)
    with tempfile.TemporaryDirectory(prefix=".convert-", dir=Path(args.output).resolve().parent) as tmp:
        save_checkpoint(Path(tmp) / "model.safetensors", tensors, metadata)
        del tensors
        return ldm.load_model(Path(tmp) / "model.safetensors", config=args.config,
                              parameterization=args.parameterization)


if __name__ == "__main__":
    run_cli(main)
