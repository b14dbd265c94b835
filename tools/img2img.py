#!/usr/bin/env python
"""Image-to-image (SDEdit) and inpainting: an image and a prompt in, images out.

    python tools/img2img.py --init-img sketch.png --prompt "a fantasy landscape" --strength 0.75
    python tools/img2img.py --init-img photo.png --mask mask.png --prompt "a red sofa"   # white = repaint

The init image is read as the training data is (upright by its EXIF tag, 16-bit scaled to 8 bits,
transparency on white) and resized to a multiple of what the whole model needs
(64 px for SD: the autoencoder's 8 x the UNet's 8) if needed.
`--strength` 1 starts from (almost) pure noise, small values stay close to the input. With
`--mask`, only the white part is repainted: the black part is kept by re-noising the known latent
at every step (any model), or through the extra input channels of an SD inpainting checkpoint.
Outputs, metadata and flags otherwise as txt2img.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ldm import InputError
from ldm.cli import HelpFormatter, end_without_final_collection, run_cli
from ldm.cli.flags import add_generation_args, check_generation_args, read_prompts


def read_image(path: str, what: str) -> Image.Image:
    """The file as training reads it (`ldm.images.open_image`: upright by its EXIF tag)."""
    from ldm.images import open_image

    if not Path(path).is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        return open_image(path)  # refuses decompression bombs and huge images from the header (InputError)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        # ValueError: InputError, or PIL's "Decompressed data too large" (a bomb in a PNG text chunk)
        raise InputError(f"cannot read {what} {path}: {exc}") from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_generation_args(p, outdir="outputs/img2img-samples")
    p.add_argument("--init-img", required=True, help="the image to start from")
    p.add_argument("--strength", type=float, default=0.75, help="how much to change it, in (0, 1]")
    p.add_argument("--mask", default=None, help="inpainting mask, same size as the image: white = repaint")
    args = p.parse_args()
    check_generation_args(args)
    if not 0 < args.strength <= 1:
        raise InputError(f"--strength must be in (0, 1], got {args.strength}")
    prompts = read_prompts(args)
    # torch and the model stack load only now: --help and bad flags answer without them
    from ldm.cli.generate import load_for_generation, run
    from ldm.images import to_rgb

    init = to_rgb(read_image(args.init_img, "init image"))  # 16-bit scaled, transparency on white, as in training
    mask = read_image(args.mask, "mask") if args.mask else None
    if mask is not None and mask.size != init.size:
        raise InputError(f"the mask is {mask.width}x{mask.height} but the init image is {init.width}x{init.height}; "
                         "give a mask of the same size")
    model, device, digest = load_for_generation(args)
    f = model.size_multiple  # the autoencoder's factor times the denoiser's own
    width, height = max(f, init.width // f * f), max(f, init.height // f * f)
    if (width, height) != init.size:
        print(f"note: resized the init image from {init.width}x{init.height} to {width}x{height} "
              f"(a multiple of {f})")
        init = init.resize((width, height), Image.LANCZOS)
        mask = mask.resize((width, height), Image.NEAREST) if mask is not None else None
    run(args, model, device, digest, prompts, {"init_image": init, "strength": args.strength, "mask": mask},
        record={"init_image": args.init_img, "mask": args.mask})
    end_without_final_collection()  # the images are written: skip the slow shutdown


if __name__ == "__main__":
    run_cli(main)
