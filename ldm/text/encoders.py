"""Text conditioning: CLIP text encoders (Radford et al. 2021) built with open_clip, and a small one.

- `OpenCLIPTextEncoder`: the text tower of any open_clip architecture that uses the CLIP BPE
  tokenizer, without the vision tower. Its state dict has the names of SD 2.x's
  `FrozenOpenCLIPEmbedder` (`model.positional_embedding`, `model.transformer.resblocks.N...`), so
  `cond_stage_model.*` of SD 2.x loads with no renaming. SD 2.x: ViT-H-14 (OpenCLIP, Cherti et al.
  2023), `layer="penultimate"`, padding 0. SD 1.x: ViT-L-14 with quick_gelu, `layer="last"`,
  padding with EOT, no projection; its Hugging Face layout maps with `hf_clip_to_open_clip`.
- `SmallTextEncoder`: a trainable CLIP-style text transformer for models trained from scratch, as
  LDM's text-to-image model trained its own text transformer (Rombach et al. 2022, Sec. 4.3).

`encode([""])` is the unconditional context for classifier-free guidance (not zeros).
"""
from __future__ import annotations

import difflib
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from common.errors import InputError
from ldm.text.prompts import encode_prompts
from ldm.text.tokenizer import VOCAB_SIZE, tokenize
from ldm.text.transformer import TextTower

LAYERS = ("last", "penultimate")


class _CLIPText(nn.Module):
    """An open_clip `CLIP` without its visual tower: SD 2.x's `FrozenOpenCLIPEmbedder.model`.

    Attributes are assigned in `CLIP.__init__`'s order, so the state dict has its names and order.
    """

    def __init__(self, text_cfg: Mapping[str, Any], embed_dim: int | None, quick_gelu: bool,
                 open_clip_tower: bool = True) -> None:
        super().__init__()
        if open_clip_tower:  # the text tower alone, with every TextTransformer option
            from open_clip.model import _build_text_tower
            tower = _build_text_tower(embed_dim or 0, dict(text_cfg), quick_gelu)  # output_dim 0: no text_projection
        else:  # the same tower with the default options, without importing open_clip (ldm/text/transformer.py)
            tower = TextTower(embed_dim or 0, text_cfg, quick_gelu)
        self.transformer = tower.transformer
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection  # unused for conditioning, kept for the checkpoint layout
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)  # causal; None for no_causal_mask
        if embed_dim:
            self.logit_scale = nn.Parameter(torch.ones([]) * torch.tensor(1 / 0.07).log())


class OpenCLIPTextEncoder(nn.Module):
    """A CLIP text transformer: `forward(tokens) -> context (B, context_length, width)`.

    `layer="last"`: `ln_final(transformer(x))`, the token features of CLIP's `encode_text` before
    pooling and projection. `layer="penultimate"` (SD 2.x): all blocks but the last, then `ln_final`;
    with `final_norm=False` (SDXL's `FrozenOpenCLIPEmbedder2`) without it. `embed_dim=None` leaves out
    `text_projection` and `logit_scale` (SD 1.x checkpoints have neither). `bpe`: the tokenizer's merges
    file (None: CLIP's). Frozen (no gradients, eval mode) unless `trainable`.
    """

    open_clip_tower = True  # built by open_clip (every TextTransformer option); False: ldm/text/transformer.py

    def __init__(self, text_cfg: Mapping[str, Any], *, embed_dim: int | None = None, quick_gelu: bool = False,
                 layer: str = "penultimate", pad_token_id: int = 0, trainable: bool = False,
                 final_norm: bool = True, bpe: str | None = None) -> None:
        super().__init__()
        if layer not in LAYERS:
            raise InputError(f"text encoder layer {layer!r} is not one of {', '.join(LAYERS)}")
        if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name") or text_cfg.get("embed_cls"):
            raise InputError("this text tower uses a Hugging Face model or tokenizer, or a class token; supported are "
                             "open_clip text transformers with the CLIP tokenizer (e.g. ViT-H-14, ViT-L-14, ViT-bigG-14)")
        if text_cfg.get("layers", 12) < (2 if layer == "penultimate" else 1):
            raise InputError(f"layer={layer!r} needs more transformer layers than {text_cfg.get('layers')}")
        self.model = _CLIPText(text_cfg, embed_dim, quick_gelu, open_clip_tower=self.open_clip_tower)
        self.layer, self.pad_token_id, self.trainable = layer, pad_token_id, trainable
        self.final_norm, self.bpe = final_norm, bpe
        self.context_length = self.model.positional_embedding.shape[0]
        self.width = self.model.positional_embedding.shape[1]
        self.requires_grad_(trainable)
        self.train(trainable)

    @classmethod
    def from_arch(cls, arch: str, *, with_projection: bool = True, quick_gelu: bool = False,
                  context_length: int = 77, **kwargs: Any) -> "OpenCLIPTextEncoder":
        """The text tower of open_clip architecture `arch` ("ViT-H-14", "ViT-L-14", ...), random weights.

        quick_gelu is used if asked for or if the architecture says so ("ViT-L-14-quickgelu").
        """
        import open_clip
        cfg = open_clip.get_model_config(arch)
        if cfg is None or "text_cfg" not in cfg:
            close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
            raise InputError(f"unknown open_clip architecture {arch!r}{hint}")
        text_cfg = {**cfg["text_cfg"], "context_length": context_length}
        return cls(text_cfg, embed_dim=cfg["embed_dim"] if with_projection else None,
                   quick_gelu=quick_gelu or bool(cfg.get("quick_gelu")), **kwargs)

    def train(self, mode: bool = True) -> "OpenCLIPTextEncoder":
        return super().train(mode and self.trainable)  # a frozen encoder stays in eval mode

    @property
    def device(self) -> torch.device:
        return self.model.positional_embedding.device

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode_tokens(tokens)[0]

    def encode_tokens(self, tokens: torch.Tensor, *, pooled: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context, pooled): the chosen layer's token features and, with `pooled`, CLIP's text embedding
        `ln_final(last)[EOT] @ text_projection` (EOT: the largest id, as open_clip's `encode_text`)."""
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise InputError(f"tokens must have shape (batch, {self.context_length}), got {tuple(tokens.shape)}")
        model = self.model
        x = model.token_embedding(tokens) + model.positional_embedding
        blocks = model.transformer.resblocks
        batch_first = getattr(model.transformer, "batch_first", False)  # older open_clip: blocks take (L, N, D)
        x = x if batch_first else x.transpose(0, 1)
        chosen = len(blocks) - (self.layer == "penultimate")
        context = None
        for i, block in enumerate(blocks[:len(blocks) if pooled else chosen]):
            if i == chosen:
                context = x
            x = block(x, attn_mask=model.attn_mask)
        context = x if context is None else context
        context = context if batch_first else context.transpose(0, 1)
        context = model.ln_final(context) if self.final_norm else context
        if not pooled:
            return context, None
        last = model.ln_final(x if batch_first else x.transpose(0, 1))
        return context, last[torch.arange(len(tokens)), tokens.argmax(dim=-1)] @ model.text_projection

    def tokenize(self, prompts: str | Sequence[str]) -> torch.Tensor:
        return tokenize(prompts, context_length=self.context_length, pad_token_id=self.pad_token_id, bpe=self.bpe)

    def encode(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Context (B, context_length, width) of `prompts` read literally, in one window (longer ones are cut,
        with a warning), as training reads captions; `encode([""])` is the unconditional context."""
        return self(self.tokenize(prompts).to(self.device))

    vector_dim = None  # no vector conditioning (SDXL's conditioner has one)

    def condition(self, prompts: str | Sequence[str], **micro: Any) -> torch.Tensor:
        """The denoiser's conditioning for `prompts`: the context (B, context_length * chunks, width) of prompts
        in A1111's syntax, of any length, with textual-inversion embeddings (`ldm/text/prompts.py`); a plain
        prompt that fits one window gives exactly `encode`'s context. SDXL's micro-conditioning
        (`image_size`, `unconditional`, ...) does not apply to a text encoder alone and is ignored."""
        return encode_prompts(self, prompts)[0]


class SmallTextEncoder(OpenCLIPTextEncoder):
    """A small trainable text transformer over the CLIP tokenizer, for models trained from scratch:
    token embedding, learned positional embedding, `layers` causal pre-LN blocks, final LayerNorm.
    Built without open_clip (`ldm/text/transformer.py`: the same tower, weights and names)."""

    open_clip_tower = False

    def __init__(self, *, width: int = 512, layers: int = 4, heads: int = 8, context_length: int = 77,
                 quick_gelu: bool = False, layer: str = "last", pad_token_id: int = 0, trainable: bool = True,
                 final_norm: bool = True, bpe: str | None = None) -> None:
        text_cfg = {"context_length": context_length, "vocab_size": VOCAB_SIZE, "width": width, "heads": heads,
                    "layers": layers}
        super().__init__(text_cfg, embed_dim=None, quick_gelu=quick_gelu, layer=layer,
                         pad_token_id=pad_token_id, trainable=trainable, final_norm=final_norm, bpe=bpe)


