"""Fresh Gaussian noise for the stochastic samplers, from one generator or one per batch item."""
from __future__ import annotations

from typing import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """N(0, I) shaped like x. With a list of generators, item k draws from generator k, so a
    sample's noise does not depend on what else is in the batch (image k is reproducible alone)."""
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else x.device
        return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
    return torch.cat([torch.randn((1, *x.shape[1:]), generator=g, device=g.device, dtype=x.dtype).to(x.device)
                      for g in generator])
