"""Pieces of latent diffusion training that tools/train_ldm.py strings together.

Process setup for torchrun (DDP on NCCL for GPUs, gloo for CPU), the typed training config, the
module that is optimised (denoiser + trainable text encoder), checkpoints (written by rank 0 only,
atomically) and the learning-rate schedule. The loop itself reads top to bottom in the tool.
"""
from __future__ import annotations


import torch
from torch import nn




class Trainable(nn.Module):
    """What the optimiser updates: the denoiser and, for from-scratch models, the text encoder.

    `forward(x_t, t, tokens)` encodes the tokens (with gradients when the text encoder trains) and
    runs the denoiser, so DDP sees one module and one forward per micro-batch.
    """

    def __init__(self, denoiser: nn.Module, text_encoder: nn.Module | None, train_text: bool):
        super().__init__()
        self.denoiser = denoiser
        self.text_encoder = text_encoder if train_text else None
        # Not registered as a submodule: a frozen encoder is neither optimised, nor averaged, nor wrapped by DDP.
        object.__setattr__(self, "_frozen_text", None if train_text else text_encoder)

    def context(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.text_encoder is not None:
            return self.text_encoder(tokens)
        with torch.no_grad():
            return self._frozen_text(tokens)

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        return self.denoiser(x, t, self.context(tokens) if context is None else context)


