"""The module that latent diffusion training optimises, wraps in DDP/FSDP and averages in the EMA."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class Trainable(nn.Module):
    """What the optimiser updates: the denoiser and, for from-scratch models, the text encoder.

    It holds the trained modules only (the ones `LatentDiffusion` holds, so its keys are the model's
    `denoiser.*` and `text_encoder.*`). `forward(x_t, t, tokens)` runs the trained text encoder inside
    the forward, so DDP sees one module and one forward per micro-batch; with a frozen encoder the
    caller passes its output, `forward(x_t, t, context=...)`, and for SDXL-style models the vector
    conditioning too, `forward(x_t, t, context=..., y=...)`; an SDXL-style conditioner that trains (LoRA adapters
    on its towers) runs inside too: `forward(x_t, t, condition=fn)`, fn(conditioner) -> {"context", "y"}.
    """

    def __init__(self, denoiser: nn.Module, text_encoder: nn.Module | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.text_encoder = text_encoder

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor | None = None,
                context: torch.Tensor | None = None, y: torch.Tensor | None = None,
                condition: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
        if condition is not None:
            cond = condition(self.text_encoder)
            context, y = cond["context"], cond["y"]
        if context is None:
            if self.text_encoder is None:
                raise ValueError("Trainable without a text encoder needs `context` (the frozen encoder's output)")
            context = self.text_encoder(tokens)
        if y is not None:
            return self.denoiser(x, t, context, y=y)
        return self.denoiser(x, t, context)
