#!/usr/bin/env python
"""Text-to-image: a prompt in, images out.

    python tools/txt2img.py --prompt "red apple"                                  # the embedded default model
    python tools/txt2img.py --prompt "a photo of a cat" --ckpt v1-5-pruned-emaonly.safetensors --H 512 --W 512
    python tools/txt2img.py --from-file prompts.txt --n_samples 4 --sampler dpmpp_2m_karras --steps 25
    python tools/txt2img.py --prompt "a lighthouse at dusk" --ckpt sd_xl_base_1.0.safetensors --sampler euler \\
        --steps 40 --scale 5 --refiner sd_xl_refiner_1.0.safetensors --refiner-switch 0.8     # SDXL, 1024 x 1024

Images go to OUTDIR/samples/NNNNN.png (never overwriting, even with several runs at once), with their
parameters in a PNG text chunk so any image can be reproduced from its file; a grid per run goes to
OUTDIR/grid-NNNN.png.
Same arguments and seed give byte-identical images on the same machine.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ldm.cli import HelpFormatter, end_without_final_collection, run_cli
from ldm.cli.flags import add_generation_args, check_generation_args, read_prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_generation_args(p, outdir="outputs/txt2img-samples")
    p.add_argument("--H", type=int, default=None, help="image height in pixels (default: the model's native size)")
    p.add_argument("--W", type=int, default=None, help="image width in pixels (default: the model's native size)")
    p.add_argument("--refiner", default=None,
                   help="an SDXL refiner checkpoint: it runs the last noise levels after the base (--ckpt)")
    p.add_argument("--refiner-switch", type=float, default=0.8,
                   help="the share of the noise levels the base runs before the refiner takes over")
    args = p.parse_args()
    check_generation_args(args)
    prompts = read_prompts(args)
    # torch and the model stack load only now: --help and bad flags answer without them
    from ldm.cli.generate import load_for_generation, model_hash, run
    from ldm.formats.loading import load_model

    model, device, digest = load_for_generation(args)
    extra = {"height": args.H, "width": args.W}
    record = {}
    if args.refiner is not None:
        extra.update(refiner=load_model(args.refiner, device=device), refiner_switch=args.refiner_switch)
        record = {"refiner": args.refiner, "refiner_hash": model_hash(Path(args.refiner))}
    run(args, model, device, digest, prompts, extra, record=record)
    end_without_final_collection()  # the images are written: skip the slow shutdown


if __name__ == "__main__":
    run_cli(main)
