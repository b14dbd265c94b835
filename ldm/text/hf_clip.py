"""The CLIP text transformer (Radford et al. 2021) in the Hugging Face `CLIPTextModel` layout.

SDXL's first text embedder (sgm `FrozenCLIPEmbedder`) holds OpenAI's CLIP ViT-L/14 text tower as a
`transformers.CLIPTextModel`, so its keys are `transformer.text_model.*`. This module has exactly
those names, shapes and `state_dict` order (transformers 4.19, as sgm pins it: `position_ids` is a
persistent buffer), so `conditioner.embedders.0.*` loads with no renaming, and so do diffusers'
`text_encoder/` and kohya's `lora_te1_*` names. The computation is transformers' `CLIPTextTransformer`
without a padding mask (sgm passes none): pre-LN blocks with a causal mask, heads of size
hidden/heads with q scaled by head_size**-0.5.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from common.config import check_keys, check_range, coerce_numbers
from common.errors import InputError
from ldm.text.prompts import encode_prompts
from ldm.text.tokenizer import tokenize

ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu}


@dataclass
class HFCLIPConfig:
    """`transformers.CLIPTextConfig` fields that shape the tower; the defaults are OpenAI's ViT-L/14 text tower."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        coerce_numbers(self, "hf_config")
        check_range(self, "text_encoder hf_config", {
            "vocab_size": (1, 1_000_000), "hidden_size": (1, 16384), "intermediate_size": (1, 65536),
            "num_hidden_layers": (1, 128), "num_attention_heads": (1, 256), "max_position_embeddings": (2, 4096),
            "layer_norm_eps": (0, 1)})
        if self.hidden_act not in ACTIVATIONS:
            raise InputError(f"text_encoder hf_config: hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise InputError(f"text_encoder hf_config: hidden_size {self.hidden_size} does not split into "
                             f"{self.num_attention_heads} heads")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HFCLIPConfig":
        check_keys(cls, dict(d), "text_encoder hf_config")
        return cls(**d)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.k_proj, self.v_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.q_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, width = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale head_size**-0.5, as CLIP
        return self.out_proj(out.transpose(1, 2).reshape(b, n, width))


class _MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _EncoderLayer(nn.Module):
    def __init__(self, config: HFCLIPConfig):
        super().__init__()
        width = config.hidden_size
        self.self_attn = _Attention(width, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = _MLP(width, config.intermediate_size, config.hidden_act)
        self.layer_norm2 = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Embeddings(nn.Module):
    def __init__(self, config: HFCLIPConfig):
        super().__init__()
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings)[None])  # int64 [1, 77]
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)


class _Encoder(nn.Module):
    def __init__(self, config: HFCLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList(_EncoderLayer(config) for _ in range(config.num_hidden_layers))


class _TextTransformer(nn.Module):
    def __init__(self, config: HFCLIPConfig):
        super().__init__()
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class HFCLIPTextModel(nn.Module):
    """`transformers.CLIPTextModel`'s module tree (`text_model.*`); `hidden_state(tokens, n)` is its
    `hidden_states[n]`: the token embeddings after the first n blocks (n = layers: the last block's output,
    before `final_layer_norm`)."""

    def __init__(self, config: HFCLIPConfig):
        super().__init__()
        self.config = config
        self.text_model = _TextTransformer(config)

    def hidden_state(self, tokens: torch.Tensor, blocks: int) -> torch.Tensor:
        embeddings = self.text_model.embeddings
        x = embeddings.token_embedding(tokens) + embeddings.position_embedding.weight[:tokens.shape[1]]
        for layer in self.text_model.encoder.layers[:blocks]:
            x = layer(x)
        return x


class HFCLIPTextEncoder(nn.Module):
    """A CLIP text tower in Hugging Face layout as a text encoder: `forward(tokens) -> context`.

    `transformer` is the `CLIPTextModel` (keys `transformer.text_model.*`, as sgm's `FrozenCLIPEmbedder`).
    `layer="last"` is `last_hidden_state` (after `final_layer_norm`); `layer="penultimate"` is
    `hidden_states[-2]`, the output of all blocks but the last, with `final_layer_norm` only when
    `final_norm` (SDXL: `layer="hidden", layer_idx=11`, no norm). Always frozen.
    """

    def __init__(self, config: HFCLIPConfig, *, layer: str = "last", final_norm: bool = True,
                 pad_token_id: int = 49407, bpe: str | None = None) -> None:
        super().__init__()
        if layer not in ("last", "penultimate"):
            raise InputError(f"text encoder layer {layer!r} is not one of last, penultimate")
        if layer == "penultimate" and config.num_hidden_layers < 2:
            raise InputError("layer 'penultimate' needs at least 2 transformer layers")
        self.transformer = HFCLIPTextModel(config)
        self.layer, self.final_norm, self.pad_token_id, self.bpe = layer, final_norm or layer == "last", pad_token_id, bpe
        self.context_length, self.width = config.max_position_embeddings, config.hidden_size
        self.trainable = False
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "HFCLIPTextEncoder":
        return super().train(False)  # frozen: stays in eval mode

    @property
    def device(self) -> torch.device:
        return self.transformer.text_model.final_layer_norm.weight.device

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode_tokens(tokens)[0]

    def encode_tokens(self, tokens: torch.Tensor, *, pooled: bool = False) -> tuple[torch.Tensor, None]:
        if pooled:
            raise InputError("the Hugging Face CLIP text tower here gives no pooled vector (SDXL pools OpenCLIP bigG)")
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise InputError(f"tokens must have shape (batch, {self.context_length}), got {tuple(tokens.shape)}")
        layers = self.transformer.config.num_hidden_layers
        x = self.transformer.hidden_state(tokens, layers - (self.layer == "penultimate"))
        return (self.transformer.text_model.final_layer_norm(x) if self.final_norm else x), None

    def tokenize(self, prompts) -> torch.Tensor:
        return tokenize(prompts, context_length=self.context_length, pad_token_id=self.pad_token_id, bpe=self.bpe)

    def encode(self, prompts) -> torch.Tensor:
        return self(self.tokenize(prompts).to(self.device))

    vector_dim = None

    def condition(self, prompts, **micro: Any) -> torch.Tensor:
        """The context of `prompts` in A1111's syntax, of any length (`ldm/text/prompts.py`; micro-conditioning
        is the conditioner's, ignored here)."""
        return encode_prompts(self, prompts)[0]
