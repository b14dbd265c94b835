"""Run a spatial function over overlapping tiles and blend the seams.

Used for encoding and decoding images larger than memory allows. Each tile's output is weighted by
a ramp that rises across the overlap with its neighbours (and is flat at the image border), and the
weighted sum is normalised, so seams fade from one tile into the next. GroupNorm and the mid-block
attention see one tile at a time, so results differ slightly from a whole-image pass; away from the
seams the difference is the change in those statistics, small for tiles of typical size.
"""
from __future__ import annotations

from typing import Callable

import torch


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length); the last tile ends at `length`."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return sorted(set(starts))


def _ramp(length: int, fade: int, fade_start: bool, fade_end: bool, device, dtype) -> torch.Tensor:
    w = torch.ones(length, device=device, dtype=dtype)
    fade = min(fade, length // 2)
    if fade > 0:
        ramp = torch.arange(1, fade + 1, device=device, dtype=dtype) / (fade + 1)
        if fade_start:
            w[:fade] = ramp
        if fade_end:
            w[length - fade:] = ramp.flip(0)
    return w


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    tile_size: int,
    overlap: int,
    scale: float,
    align: int = 1,
) -> torch.Tensor:
    """Apply `fn` to overlapping tiles of `x` (B, C, H, W) and blend the results.

    `fn` maps a tile of size (h, w) to an output of size (h*scale, w*scale). `tile_size` and
    `overlap` are in input pixels; tile offsets are multiples of `align` (the encoder needs offsets
    divisible by its downsampling factor so that tile outputs land on whole latent pixels).
    """
    if overlap < 0 or overlap >= tile_size:
        raise ValueError(f"tile overlap must be in [0, tile_size); got overlap={overlap}, tile_size={tile_size}")
    tile_size = max(align, tile_size // align * align)
    stride = max(align, (tile_size - overlap) // align * align)
    _, _, height, width = x.shape
    rows = tile_starts(height, tile_size, stride)
    cols = tile_starts(width, tile_size, stride)
    out = weight_sum = None
    fade = round(overlap * scale)
    for r in rows:
        for c in cols:
            tile = x[:, :, r:r + tile_size, c:c + tile_size]
            y = fn(tile)
            if out is None:
                out_shape = (y.shape[0], y.shape[1], round(height * scale), round(width * scale))
                out = torch.zeros(out_shape, device=y.device, dtype=torch.float32)
                weight_sum = torch.zeros(out_shape[2:], device=y.device, dtype=torch.float32)
            r0, c0 = round(r * scale), round(c * scale)
            th, tw = y.shape[2], y.shape[3]
            wr = _ramp(th, fade, r > 0, r + tile_size < height, y.device, torch.float32)
            wc = _ramp(tw, fade, c > 0, c + tile_size < width, y.device, torch.float32)
            w = wr[:, None] * wc[None, :]
            out[:, :, r0:r0 + th, c0:c0 + tw] += y.float() * w
            weight_sum[r0:r0 + th, c0:c0 + tw] += w
    return (out / weight_sum).to(y.dtype)
