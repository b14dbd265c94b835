"""CLIP's text transformer in open_clip's layout, with torch alone: the tower of `SmallTextEncoder`.

open_clip's `TextTransformer` with its default options (causal mask, pre-LN residual attention blocks,
GELU or QuickGELU MLP of 4x width, no layer scale, argmax pooling, a plain `text_projection`), built as
`open_clip.model._build_text_tower` builds it: the same modules, created in the same order, then the same
`init_parameters`. So a seed gives the same weights, the state dict has the same names and the outputs
are the same (`tests/test_startup.py` compares the two), and a model with a small text encoder never
imports open_clip (seconds: it loads torchvision, timm and transformers).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import InputError

SIZES = ("context_length", "vocab_size", "width", "heads", "layers")  # the text_cfg keys this tower reads


class LayerNorm(nn.LayerNorm):
    """open_clip's LayerNorm: torch's, with the output cast back to the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation of OpenAI's CLIP (SD 1.x's text encoder)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """x + attn(ln_1(x)), then + mlp(ln_2(x)); open_clip's names (`ls_1` / `ls_2`: no layer scale)."""

    def __init__(self, width: int, heads: int, act_layer: type[nn.Module]) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ls_1 = nn.Identity()
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", act_layer()),
                                              ("c_proj", nn.Linear(width * 4, width))]))
        self.ls_2 = nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        attn_mask = attn_mask.to(x.dtype) if attn_mask is not None else None
        h = self.ln_1(x)
        x = x + self.ls_1(self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    """The blocks, batch first (open_clip's `Transformer`; the encoder runs `resblocks` itself)."""

    batch_first = True

    def __init__(self, width: int, layers: int, heads: int, act_layer: type[nn.Module]) -> None:
        super().__init__()
        self.width, self.layers, self.grad_checkpointing = width, layers, False
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, act_layer) for _ in range(layers)])


class TextTower(nn.Module):
    """open_clip's `TextTransformer` parts: token and positional embeddings, blocks, `ln_final`, the causal
    mask and `text_projection` (None for `output_dim` 0)."""

    def __init__(self, output_dim: int, text_cfg: Mapping[str, Any], quick_gelu: bool = False) -> None:
        super().__init__()
        unknown = sorted(set(text_cfg) - set(SIZES))
        if unknown:
            raise InputError(f"text tower options {unknown} need open_clip's tower (kind open_clip); this one reads "
                             f"{', '.join(SIZES)}")
        context_length, vocab_size = text_cfg.get("context_length", 77), text_cfg.get("vocab_size", 49408)
        width, heads, layers = text_cfg.get("width", 512), text_cfg.get("heads", 8), text_cfg.get("layers", 12)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, QuickGELU if quick_gelu else nn.GELU)
        self.ln_final = LayerNorm(width)
        self.register_buffer("attn_mask", torch.full((context_length, context_length), float("-inf")).triu_(1),
                             persistent=False)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim)) if output_dim else None
        self.init_parameters()

    def init_parameters(self) -> None:
        """open_clip's `TextTransformer.init_parameters`, in its order."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std, attn_std, fc_std = width ** -0.5 * (2 * layers) ** -0.5, width ** -0.5, (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        if self.text_projection is not None:
            nn.init.normal_(self.text_projection, std=width ** -0.5)
