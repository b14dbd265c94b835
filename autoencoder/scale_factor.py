"""The latent scale factor: 1 / std of the latents, so that diffusion sees unit-variance inputs."""
from __future__ import annotations

from typing import Iterable

import torch

from autoencoder.model import AutoencoderKL


@torch.no_grad()
def estimate_scale_factor(autoencoder: AutoencoderKL, images: Iterable[torch.Tensor], *,
                          generator: torch.Generator | None = None) -> float:
    """1 / std of posterior samples z ~ q(z|x) over `images` (batches in [-1, 1]).

    This is the LDM paper's rescaling (sec. 4.3.2 / app. G; `scale_by_std` in the original code,
    which used one batch); here the std is pooled over every element of every given batch.
    """
    device = next(autoencoder.parameters()).device
    count, total, total_sq = 0, 0.0, 0.0
    for batch in images:
        z = autoencoder.encode(batch.to(device)).sample(generator).double()
        count += z.numel()
        total += z.sum().item()
        total_sq += z.pow(2).sum().item()
    if count < 2:
        raise ValueError("estimate_scale_factor needs at least one image")
    mean = total / count
    var = (total_sq - count * mean * mean) / (count - 1)
    return float(1.0 / var ** 0.5)
