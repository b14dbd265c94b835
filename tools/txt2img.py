#!/usr/bin/env python
"""Text-to-image: a prompt in, images out.

    python tools/txt2img.py --prompt "red apple"                      # the embedded default model
    python tools/txt2img.py --prompt "..." --ckpt model.ckpt --config v1-inference.yaml

Status: this version loads checkpoints and their autoencoder; the denoiser, the text encoder and the
samplers are not implemented yet, so the command says so clearly instead of writing images.
"""
from __future__ import annotations

import argparse

import ldm
from ldm.cli import pick_device, run_cli


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument("--ckpt", default=None, help="checkpoint (.safetensors or .ckpt); default: the embedded model")
    p.add_argument("--config", default=None, help="original-style YAML for an original-format checkpoint")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    args = p.parse_args()
    model = ldm.load_model(args.ckpt, config=args.config, device=pick_device(args.device))
    missing = [name for name in ("denoiser", "text_encoder") if getattr(model, name) is None]
    if missing:
        raise ldm.InputError(
            f"{args.ckpt or 'the default model'} has no {' and no '.join(missing)}: text-to-image needs a full "
            "latent diffusion model, and this version implements only the autoencoder (first stage)")


if __name__ == "__main__":
    run_cli(main)
