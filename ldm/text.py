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

import dataclasses
import difflib
import functools
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from autoencoder.config import check_keys, coerce_numbers
from autoencoder.errors import InputError

from .checkpoint import load_state_dict_checked, read_checkpoint

SOT_TOKEN, EOT_TOKEN, VOCAB_SIZE = 49406, 49407, 49408
KINDS = ("open_clip", "small")
LAYERS = ("last", "penultimate")
ORIGINAL_TARGETS = ("ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                    "ldm.modules.encoders.modules.FrozenCLIPEmbedder")


@functools.cache
def _bpe() -> Any:
    from open_clip.tokenizer import SimpleTokenizer  # imported here: open_clip takes seconds to import
    return SimpleTokenizer()  # the vocabulary ships inside open_clip


def tokenize(prompts: str | Sequence[str], *, context_length: int = 77, pad_token_id: int = 0) -> torch.Tensor:
    """CLIP BPE token ids (B, context_length): SOT, text, EOT, then `pad_token_id`.

    Equals `open_clip.tokenize` for padding 0 (SD 2.x); SD 1.x's HF tokenizer pads with EOT (49407).
    Longer prompts are truncated with EOT kept as the last token, with a warning.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    tokens = torch.full((len(prompts), context_length), pad_token_id, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise InputError(f"prompt {i} is a {type(prompt).__name__}, not a string")
        ids = [SOT_TOKEN] + _bpe().encode(prompt) + [EOT_TOKEN]
        if len(ids) > context_length:
            warnings.warn(f"prompt {i} is {len(ids)} tokens long (with start/end tokens) but the text encoder reads "
                          f"{context_length}: the last {len(ids) - context_length} tokens were dropped", stacklevel=2)
            ids = ids[:context_length - 1] + [EOT_TOKEN]
        tokens[i, :len(ids)] = torch.tensor(ids)
    return tokens


class _CLIPText(nn.Module):
    """An open_clip `CLIP` without its visual tower: SD 2.x's `FrozenOpenCLIPEmbedder.model`.

    Attributes are assigned in `CLIP.__init__`'s order, so the state dict has its names and order.
    """

    def __init__(self, text_cfg: Mapping[str, Any], embed_dim: int | None, quick_gelu: bool) -> None:
        super().__init__()
        from open_clip.model import _build_text_tower  # the text tower alone, with every TextTransformer option
        tower = _build_text_tower(embed_dim or 0, dict(text_cfg), quick_gelu)  # output_dim 0: no text_projection
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
    pooling and projection. `layer="penultimate"` (SD 2.x): all blocks but the last, then `ln_final`.
    `embed_dim=None` leaves out `text_projection` and `logit_scale` (SD 1.x checkpoints have neither).
    Frozen (no gradients, eval mode) unless `trainable`.
    """

    def __init__(self, text_cfg: Mapping[str, Any], *, embed_dim: int | None = None, quick_gelu: bool = False,
                 layer: str = "penultimate", pad_token_id: int = 0, trainable: bool = False) -> None:
        super().__init__()
        if layer not in LAYERS:
            raise InputError(f"text encoder layer {layer!r} is not one of {', '.join(LAYERS)}")
        if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name") or text_cfg.get("embed_cls"):
            raise InputError("this text tower uses a Hugging Face model or tokenizer, or a class token; supported are "
                             "open_clip text transformers with the CLIP tokenizer (e.g. ViT-H-14, ViT-L-14, ViT-bigG-14)")
        if text_cfg.get("layers", 12) < (2 if layer == "penultimate" else 1):
            raise InputError(f"layer={layer!r} needs more transformer layers than {text_cfg.get('layers')}")
        self.model = _CLIPText(text_cfg, embed_dim, quick_gelu)
        self.layer, self.pad_token_id, self.trainable = layer, pad_token_id, trainable
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
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise InputError(f"tokens must have shape (batch, {self.context_length}), got {tuple(tokens.shape)}")
        model = self.model
        x = model.token_embedding(tokens) + model.positional_embedding
        blocks = model.transformer.resblocks
        batch_first = getattr(model.transformer, "batch_first", False)  # older open_clip: blocks take (L, N, D)
        x = x if batch_first else x.transpose(0, 1)
        for block in blocks[:len(blocks) - (self.layer == "penultimate")]:
            x = block(x, attn_mask=model.attn_mask)
        x = x if batch_first else x.transpose(0, 1)
        return model.ln_final(x)

    def tokenize(self, prompts: str | Sequence[str]) -> torch.Tensor:
        return tokenize(prompts, context_length=self.context_length, pad_token_id=self.pad_token_id)

    def encode(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Context (B, context_length, width) for `prompts`; `encode([""])` is the unconditional context."""
        return self(self.tokenize(prompts).to(self.device))


class SmallTextEncoder(OpenCLIPTextEncoder):
    """A small trainable text transformer over the CLIP tokenizer, for models trained from scratch:
    token embedding, learned positional embedding, `layers` causal pre-LN blocks, final LayerNorm."""

    def __init__(self, *, width: int = 512, layers: int = 4, heads: int = 8, context_length: int = 77,
                 quick_gelu: bool = False, layer: str = "last", pad_token_id: int = 0, trainable: bool = True) -> None:
        text_cfg = {"context_length": context_length, "vocab_size": VOCAB_SIZE, "width": width, "heads": heads,
                    "layers": layers}
        super().__init__(text_cfg, embed_dim=None, quick_gelu=quick_gelu, layer=layer,
                         pad_token_id=pad_token_id, trainable=trainable)


@dataclass
class TextEncoderConfig:
    """A text encoder; `None` fields take the kind's default (open_clip: penultimate, frozen;
    small: last, trainable). The defaults are SD 2.x's ViT-H-14."""

    kind: str = "open_clip"
    arch: str = "ViT-H-14"          # open_clip architecture name (kind "open_clip")
    layer: str | None = None        # "last" | "penultimate"
    quick_gelu: bool = False        # also on where the arch says so ("...-quickgelu")
    pad_token_id: int = 0           # 0 for SD 2.x (open_clip), 49407 (EOT) for SD 1.x (HF tokenizer)
    context_length: int = 77
    with_projection: bool = True    # keep CLIP's unused text_projection / logit_scale (SD 2.x); SD 1.x has none
    width: int = 512                # kind "small"
    layers: int = 4
    heads: int = 8
    trainable: bool | None = None

    def __post_init__(self) -> None:
        coerce_numbers(self, "text_encoder")
        if self.kind not in KINDS:
            raise InputError(f"text_encoder kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.layer is None:
            self.layer = "penultimate" if self.kind == "open_clip" else "last"
        if self.layer not in LAYERS:
            raise InputError(f"text_encoder layer {self.layer!r} is not one of {', '.join(LAYERS)}")
        if self.trainable is None:
            self.trainable = self.kind == "small"
        if not 0 <= self.pad_token_id < VOCAB_SIZE:
            raise InputError(f"text_encoder pad_token_id must be in [0, {VOCAB_SIZE}), got {self.pad_token_id}")
        if self.context_length < 2:
            raise InputError(f"text_encoder context_length must be >= 2 (start and end tokens), got {self.context_length}")
        if self.kind == "small" and (min(self.width, self.layers, self.heads) < 1 or self.width % self.heads):
            raise InputError(f"text_encoder: width {self.width} must be a positive multiple of heads {self.heads}, "
                             f"and layers ({self.layers}) >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TextEncoderConfig":
        check_keys(cls, dict(d), "text_encoder")
        return cls(**d)

    @classmethod
    def from_original(cls, cond_stage_config: Mapping[str, Any]) -> "TextEncoderConfig":
        """Read an original `cond_stage_config` section (`target` + `params`)."""
        target, params = cond_stage_config.get("target"), dict(cond_stage_config.get("params") or {})
        if target not in ORIGINAL_TARGETS:
            raise InputError(f"cond_stage_config target {target!r} is not supported; supported: {', '.join(ORIGINAL_TARGETS)}")
        if target.endswith("FrozenOpenCLIPEmbedder"):  # SD 2.x; defaults as in the original class
            _check_params(target, params, ("arch", "version", "device", "max_length", "freeze", "layer"))
            # max_length is ignored there too: the original tokenizes with open_clip.tokenize (77)
            return cls(kind="open_clip", arch=params.get("arch", "ViT-H-14"), layer=params.get("layer", "last"),
                       pad_token_id=0, trainable=not params.get("freeze", True))
        _check_params(target, params, ("version", "device", "max_length", "freeze", "layer", "layer_idx"))
        version = params.get("version", "openai/clip-vit-large-patch14")
        if not str(version).endswith("clip-vit-large-patch14"):
            raise InputError(f"{target}: version {version!r} is not supported; only openai/clip-vit-large-patch14 "
                             "(or use kind: open_clip with its arch)")
        if params.get("layer", "last") != "last":  # "hidden" skips final_layer_norm: not our penultimate
            raise InputError(f"{target}: layer {params['layer']!r} is not supported; only 'last' (SD 1.x)")
        if params.get("max_length", 77) != 77:
            raise InputError(f"{target}: max_length {params['max_length']} is not supported; only 77")
        return cls(kind="open_clip", arch="ViT-L-14", layer="last", quick_gelu=True, pad_token_id=EOT_TOKEN,
                   with_projection=False, trainable=not params.get("freeze", True))


def _check_params(target: str, params: Mapping[str, Any], known: Sequence[str]) -> None:
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise InputError(f"{target}: unknown params {unknown}; known are {sorted(known)}")


def build_text_encoder(config: Mapping[str, Any] | TextEncoderConfig) -> OpenCLIPTextEncoder:
    """A text encoder from `{"original": cond_stage_config}`, `{"kind": ..., ...}` or a config object."""
    if isinstance(config, Mapping) and "original" in config:
        if len(config) != 1:
            raise InputError(f"text_encoder config: 'original' takes no other keys, got {sorted(config)}")
        config = TextEncoderConfig.from_original(config["original"])
    elif not isinstance(config, TextEncoderConfig):
        config = TextEncoderConfig.from_dict(config)
    common = dict(quick_gelu=config.quick_gelu, layer=config.layer, pad_token_id=config.pad_token_id,
                  trainable=config.trainable)
    if config.kind == "small":
        return SmallTextEncoder(width=config.width, layers=config.layers, heads=config.heads,
                                context_length=config.context_length, **common)
    return OpenCLIPTextEncoder.from_arch(config.arch, with_projection=config.with_projection,
                                         context_length=config.context_length, **common)


_UNUSED_OPEN_CLIP_KEYS = ("text_projection", "logit_scale", "logit_bias")  # not used for conditioning


def load_open_clip_weights(module: OpenCLIPTextEncoder, path: str | Path) -> None:
    """Load the text tower of a local open_clip checkpoint (`open_clip_pytorch_model.bin`, .safetensors).

    `visual.*` is skipped; `text_projection`/`logit_scale` are skipped where the module has none.
    """
    tensors, _ = read_checkpoint(path)
    if tensors and all(k.startswith("module.") for k in tensors):  # saved from DistributedDataParallel
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    expected = module.state_dict()
    state = {}
    for key, value in tensors.items():
        if key.startswith("visual.") or key in ("input_resolution", "context_length", "vocab_size"):
            continue
        name = "model." + key.removeprefix("text.")  # CustomTextCLIP keeps its text tower under "text."
        if name in expected or key not in _UNUSED_OPEN_CLIP_KEYS:
            state[name] = value
    load_state_dict_checked(module, state, source=f"open_clip checkpoint {path}")


# SD 1.x (Hugging Face CLIPTextModel) <-> open_clip names, per block, in each layout's state-dict order.
_HF_ATTN = ("q_proj", "k_proj", "v_proj")
_BLOCK_NAMES = {"layer_norm1": "ln_1", "self_attn.out_proj": "attn.out_proj", "layer_norm2": "ln_2",
                "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_HF_BLOCK_ORDER = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
                   "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2")


def _take(state: dict[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if key not in state:
        raise InputError(f"{what} state dict has no {key!r}; is it a CLIP text encoder?")
    return state.pop(key)


def _num_layers(keys: Sequence[str], pattern: str) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def hf_clip_to_open_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 1.x's HF `CLIPTextModel` weights (`transformer.text_model.*`, `text_model.*` or, as in
    transformers 5, `embeddings.*`) -> our names (`model.*`, no text_projection / logit_scale).

    q, k, v projections are concatenated into `in_proj_weight` / `in_proj_bias`; position_ids is dropped.
    """
    hf = {re.sub(r"^(transformer\.)?(text_model\.)?", "", k): v for k, v in state_dict.items()}
    hf.pop("embeddings.position_ids", None)
    what = "SD 1.x text encoder"
    out = {"model.positional_embedding": _take(hf, "embeddings.position_embedding.weight", what)}
    for i in range(_num_layers(list(hf), r"encoder\.layers\.(\d+)\.")):
        src, dst = f"encoder.layers.{i}.", f"model.transformer.resblocks.{i}."
        qkv = {p: [_take(hf, f"{src}self_attn.{n}.{p}", what) for n in _HF_ATTN] for p in ("weight", "bias")}
        for hf_name, name in _BLOCK_NAMES.items():
            if name == "attn.out_proj":  # open_clip's MultiheadAttention: in_proj before out_proj
                out[dst + "attn.in_proj_weight"] = torch.cat(qkv["weight"])
                out[dst + "attn.in_proj_bias"] = torch.cat(qkv["bias"])
            for p in ("weight", "bias"):
                out[f"{dst}{name}.{p}"] = _take(hf, f"{src}{hf_name}.{p}", what)
    out["model.token_embedding.weight"] = _take(hf, "embeddings.token_embedding.weight", what)
    for p in ("weight", "bias"):
        out[f"model.ln_final.{p}"] = _take(hf, f"final_layer_norm.{p}", what)
    if hf:
        raise InputError(f"{what}: unexpected keys {sorted(hf)[:5]}")
    return out


def open_clip_to_hf_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The exact inverse of `hf_clip_to_open_clip`: our names -> `transformer.text_model.*` as in SD 1.x
    checkpoints (transformers 4.19 order), with `position_ids` = arange(context_length)[None] (int64)."""
    ours = {k.removeprefix("model."): v for k, v in state_dict.items()}
    what = "open_clip text encoder"
    if any(k in ours for k in _UNUSED_OPEN_CLIP_KEYS):
        raise InputError("SD 1.x (HF CLIPTextModel) has no text_projection / logit_scale; "
                         "use a text encoder built with with_projection=False")
    positional = _take(ours, "positional_embedding", what)
    out = {"embeddings.position_ids": torch.arange(positional.shape[0], device=positional.device)[None],
           "embeddings.token_embedding.weight": _take(ours, "token_embedding.weight", what),
           "embeddings.position_embedding.weight": positional}
    for i in range(_num_layers(list(ours), r"transformer\.resblocks\.(\d+)\.")):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        block = {f"self_attn.{n}.{p}": t for p in ("weight", "bias")
                 for n, t in zip(_HF_ATTN, _take(ours, f"{src}attn.in_proj_{p}", what).chunk(3))}  # views of one tensor
        block = {k: t.clone() for k, t in block.items()}  # safetensors refuses tensors sharing memory
        for hf_name, name in _BLOCK_NAMES.items():
            for p in ("weight", "bias"):
                block[f"{hf_name}.{p}"] = _take(ours, f"{src}{name}.{p}", what)
        out.update({f"{dst}{name}.{p}": block[f"{name}.{p}"] for name in _HF_BLOCK_ORDER for p in ("weight", "bias")})
    for p in ("weight", "bias"):
        out[f"final_layer_norm.{p}"] = _take(ours, f"ln_final.{p}", what)
    if ours:
        raise InputError(f"{what}: unexpected keys {sorted(ours)[:5]}")
    return {"transformer.text_model." + k: v for k, v in out.items()}
