"""PIL images <-> tensors: the one way pixels are read and brought to the model's [-1, 1] range, for
generation (init images, masks) and training data (`ldm.data.images`) alike."""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps

from common.errors import InputError

TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def open_image(source: str | Path | IO[bytes]) -> Image.Image:
    """An image file, upright (EXIF rotation applied). Decoded fully now, so corrupt or truncated data fails
    here, inside the caller's error handling.

    An image of more than PIL's `Image.MAX_IMAGE_PIXELS` (about 89 million, 9459 x 9459) is refused from its
    header, before anything is decoded, with an InputError: a decompression bomb (a small file that decodes
    to gigabytes), or a picture far larger than any model works at. PIL itself only warns up to twice that.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            opened = Image.open(source)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            pixels = re.search(r"\((\d+) pixels\)", str(exc))  # PIL's text: "Image size (N pixels) exceeds ..."
            size = f"{int(pixels.group(1)):,} pixels" if pixels else "more pixels than allowed"
            raise InputError(f"image refused before decoding: its header says {size}, more than the "
                             f"{Image.MAX_IMAGE_PIXELS:,} read here (a decompression bomb, or far larger than any "
                             "model works at); if it is a real picture, downscale it first") from None
    with opened as image:
        image.load()
        return ImageOps.exif_transpose(image)  # photos stored sideways with an EXIF rotation tag


def to_8_bit(image: Image.Image) -> Image.Image:
    """32-bit and 16-bit integer grayscale ("I", "I;16", "I;16B", ...) -> "L", scaled by 1/256 (65535 -> 255);
    any other mode as it is. Pillow's own conversion clips such values at 255: near-white images."""
    if not image.mode.startswith("I"):
        return image
    return Image.fromarray((np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit grayscale scaled (`to_8_bit`), transparent pixels composited on white."""
    image = to_8_bit(image)
    if image.mode in TRANSPARENT_MODES or "transparency" in image.info:
        return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, C, H, W) -> uint8 (B, H, W, C): (x / 2 + 0.5).clamp(0, 1) * 255, rounded (as diffusers)."""
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image, any mode (`to_rgb`) -> (1, 3, H, W) float32 in [-1, 1]: pixel / 127.5 - 1, as training reads it."""
    array = np.asarray(to_rgb(image), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """Mask image (white = repaint, black = keep; 16-bit too) -> (1, 1, H, W) float in {0, 1}, 1 = repaint."""
    array = np.asarray(to_8_bit(mask).convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy((array >= 0.5).astype(np.float32))[None, None]


def make_grid(images: list[Image.Image], columns: int) -> Image.Image:
    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for k, image in enumerate(images):
        grid.paste(image, ((k % columns) * width, (k // columns) * height))
    return grid
