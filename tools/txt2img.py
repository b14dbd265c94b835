#!/usr/bin/env python
"""Text-to-image: a prompt in, images out.

    python tools/txt2img.py --prompt "red apple"                                  # the embedded default model
    python tools/txt2img.py --prompt "a photo of a cat" --ckpt v1-5-pruned-emaonly.safetensors --H 512 --W 512
    python tools/txt2img.py --from-file prompts.txt --n_samples 4 --sampler dpmpp_2m_karras --steps 25

Images go to OUTDIR/samples/NNNNN.png (never overwriting, even with several runs at once), with their
parameters in a PNG text chunk so any image can be reproduced from its file; a grid per run goes to
OUTDIR/grid-NNNN.png.
Same arguments and seed give byte-identical images on the same machine.
"""
from __future__ import annotations

import argparse

from ldm.cli import HelpFormatter, run_cli
from ldm.cli.generate import add_generation_args, check_generation_args, load_for_generation, read_prompts, run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_generation_args(p, outdir="outputs/txt2img-samples")
    p.add_argument("--H", type=int, default=None, help="image height in pixels (default: the model's native size)")
    p.add_argument("--W", type=int, default=None, help="image width in pixels (default: the model's native size)")
    args = p.parse_args()
    check_generation_args(args)
    prompts = read_prompts(args)
    model, device, digest = load_for_generation(args)
    run(args, model, device, digest, prompts, {"height": args.H, "width": args.W})


if __name__ == "__main__":
    run_cli(main)
