"""Classifier-free guidance: one wrapper around the denoiser (Ho & Salimans 2022)."""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from common.errors import InputError

Denoiser = Callable[..., torch.Tensor]  # (x, t, context, **extra conditioning such as y) -> output
Conditioning = torch.Tensor | Mapping[str, torch.Tensor]  # a context, or {"context": ..., "y": ...} (SDXL)


def as_denoiser_kwargs(cond: Conditioning) -> dict[str, torch.Tensor]:
    """A conditioning as the denoiser's keyword arguments: a tensor is the context; a dict must have one."""
    if isinstance(cond, torch.Tensor):
        return {"context": cond}
    if "context" not in cond:
        raise InputError(f"a conditioning dict needs 'context' (the text encoder's output), got keys {sorted(cond)}")
    return dict(cond)


def guided_model_fn(denoiser: Denoiser, cond: Conditioning, uncond: Conditioning | None = None, *,
                    guidance_scale: float = 1.0, guidance_rescale: float = 0.0):
    """`model_fn(x, t)` giving out_u + s * (out_c - out_u) on the raw output (eps or v).

    Cond and uncond go through the network in one batch, [uncond, cond], as the original samplers
    do; a dict conditioning ({"context", "y"}) is batched entry by entry and passed as keywords. With
    `guidance_rescale` > 0 the guided output's std is pulled back towards the conditional one's (Lin
    et al. 2023, sec. 3.4, eqs. 15-16). With scale 1 or no uncond, one plain call.
    """
    if guidance_scale < 0:
        raise InputError(f"guidance scale must be >= 0, got {guidance_scale}")
    if not 0 <= guidance_rescale <= 1:
        raise InputError(f"guidance rescale must be in [0, 1], got {guidance_rescale}")
    cond = as_denoiser_kwargs(cond)
    if uncond is None or guidance_scale == 1.0:
        return lambda x, t: denoiser(x, t, **cond)
    uncond = as_denoiser_kwargs(uncond)
    shapes = {k: tuple(v.shape) for k, v in cond.items()}
    if {k: tuple(v.shape) for k, v in uncond.items()} != shapes:
        raise InputError(f"cond and uncond must have the same shape (and entries), got {shapes} and "
                         f"{ {k: tuple(v.shape) for k, v in uncond.items()} }; encode the negative prompt the same "
                         "way as the prompt")
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out_uncond, out_cond = denoiser(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        out = out_uncond + guidance_scale * (out_cond - out_uncond)
        if guidance_rescale > 0:
            dims = tuple(range(1, out.ndim))
            rescaled = out * (out_cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
            out = guidance_rescale * rescaled + (1 - guidance_rescale) * out
        return out

    return model_fn
