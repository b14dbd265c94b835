"""Text conditioning: the text-encoder config (its `kind` is the registry's choice) and the builder.

    prompt -> tokenizer (`tokenizer.py`) -> text encoder (`encoders.py`) -> context (B, tokens, width)

Checkpoint key maps for text towers (open_clip files, SD 1.x's Hugging Face CLIP) are in `keymaps.py`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from common.config import check_keys, check_range, coerce_numbers
from common.errors import InputError
from ldm.text.encoders import LAYERS, OpenCLIPTextEncoder, SmallTextEncoder
from ldm.text.hf_clip import HFCLIPConfig, HFCLIPTextEncoder
from ldm.text.tokenizer import EOT_TOKEN

OPEN_CLIP_TARGET = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"  # SD 2.x
HF_CLIP_TARGET = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"  # SD 1.x
ORIGINAL_TARGETS = (OPEN_CLIP_TARGET, HF_CLIP_TARGET)


@dataclass
class TextEncoderConfig:
    """A text encoder; `None` fields take the kind's default (open_clip: penultimate, frozen;
    small: last, trainable). The defaults are SD 2.x's ViT-H-14.

    Kinds: "open_clip" (an open_clip text tower: `arch`, or the sizes in `text_cfg` + `embed_dim`),
    "hf_clip" (CLIP in Hugging Face layout, sizes in `hf_config`: SDXL's CLIP ViT-L) and "small".
    """

    kind: str = "open_clip"
    arch: str = "ViT-H-14"          # open_clip architecture name (kind "open_clip")
    layer: str | None = None        # "last" | "penultimate"
    final_norm: bool = True         # ln_final on the chosen layer (SD 2.x); SDXL's towers: False
    text_cfg: dict | None = None    # open_clip text_cfg sizes instead of `arch` (e.g. a tiny test tower)
    embed_dim: int | None = None    # with text_cfg: the width of text_projection
    hf_config: dict | None = None   # kind "hf_clip": CLIPTextConfig sizes (None: CLIP ViT-L/14)
    bpe: str | None = None          # the tokenizer's merges file (None: CLIP's)
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
        if self.kind not in TEXT_ENCODERS:
            raise InputError(f"text_encoder kind {self.kind!r} is not one of {', '.join(TEXT_ENCODERS)}")
        if self.layer is None:
            self.layer = "penultimate" if self.kind == "open_clip" else "last"
        if self.layer not in LAYERS:
            raise InputError(f"text_encoder layer {self.layer!r} is not one of {', '.join(LAYERS)}")
        if self.trainable is None:
            self.trainable = self.kind == "small"
        check_range(self, "text_encoder", {"pad_token_id": (0, 1_000_000), "context_length": (2, 4096),
                                           "width": (1, 16384), "layers": (1, 128), "heads": (1, 256),
                                           "embed_dim": (1, 16384)})
        if self.kind == "hf_clip":
            self.hf_config = HFCLIPConfig.from_dict(self.hf_config or {})
            self.context_length = self.hf_config.max_position_embeddings
        elif self.hf_config is not None:
            raise InputError("text_encoder: hf_config is only for kind 'hf_clip'")
        if self.text_cfg is not None:
            text_cfg = self.text_cfg
            if not isinstance(text_cfg, dict) or not {"width", "heads", "layers", "vocab_size"} <= set(text_cfg):
                raise InputError("text_encoder: text_cfg needs width, heads, layers and vocab_size (open_clip's text_cfg)")
            check_range(text_cfg, "text_encoder text_cfg", {"width": (1, 16384), "heads": (1, 256), "layers": (1, 128),
                                                            "vocab_size": (1, 1_000_000), "context_length": (2, 4096)})
        if self.kind == "small" and (min(self.width, self.layers, self.heads) < 1 or self.width % self.heads):
            raise InputError(f"text_encoder: width {self.width} must be a positive multiple of heads {self.heads}, "
                             f"and layers ({self.layers}) >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # hf_config (a dataclass) becomes its dict too

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
            _check_params(target, params, ("arch", "version", "device", "max_length", "freeze", "layer", "text_cfg",
                                           "embed_dim"))
            # max_length is ignored there too: the original tokenizes with open_clip.tokenize (77). text_cfg and
            # embed_dim (ours, e.g. from a diffusers folder) give a tower of other sizes than `arch`'s.
            sizes = {"text_cfg": dict(params["text_cfg"]), "embed_dim": params.get("embed_dim"),
                     "context_length": params["text_cfg"].get("context_length", 77)} if "text_cfg" in params else {}
            return cls(kind="open_clip", arch=params.get("arch", "ViT-H-14"), layer=params.get("layer", "last"),
                       pad_token_id=0, trainable=not params.get("freeze", True), **sizes)
        _check_params(target, params, ("version", "device", "max_length", "freeze", "layer", "layer_idx", "hf_config"))
        version = params.get("version", "openai/clip-vit-large-patch14")
        if not str(version).endswith("clip-vit-large-patch14"):
            raise InputError(f"{target}: version {version!r} is not supported; only openai/clip-vit-large-patch14 "
                             "(or use kind: open_clip with its arch)")
        if params.get("layer", "last") != "last":  # "hidden" skips final_layer_norm: not our penultimate
            raise InputError(f"{target}: layer {params['layer']!r} is not supported; only 'last' (SD 1.x)")
        if params.get("max_length", 77) != 77:
            raise InputError(f"{target}: max_length {params['max_length']} is not supported; only 77")
        sizes = {}
        if params.get("hf_config"):  # ours (e.g. a diffusers folder): other sizes, as an open_clip text_cfg
            hf = HFCLIPConfig.from_dict(params["hf_config"])
            sizes = {"text_cfg": {"context_length": hf.max_position_embeddings, "vocab_size": hf.vocab_size,
                                  "width": hf.hidden_size, "heads": hf.num_attention_heads,
                                  "layers": hf.num_hidden_layers, "mlp_ratio": hf.intermediate_size / hf.hidden_size},
                     "context_length": hf.max_position_embeddings}
            if hf.hidden_act not in ("quick_gelu", "gelu"):
                raise InputError(f"{target}: hidden_act {hf.hidden_act!r} is not supported; quick_gelu or gelu")
        quick_gelu = not sizes or params["hf_config"].get("hidden_act", "quick_gelu") == "quick_gelu"
        return cls(kind="open_clip", arch="ViT-L-14", layer="last", quick_gelu=quick_gelu, pad_token_id=EOT_TOKEN,
                   with_projection=False, trainable=not params.get("freeze", True), **sizes)

    def to_original(self) -> dict[str, Any]:
        """The original `cond_stage_config` this config reads from (`from_original`'s inverse)."""
        sd1 = dict(kind="open_clip", arch="ViT-L-14", layer="last", pad_token_id=EOT_TOKEN, with_projection=False,
                   final_norm=True, bpe=None)
        freeze = {} if not self.trainable else {"freeze": False}
        if all(getattr(self, k) == v for k, v in sd1.items()) and (self.quick_gelu or self.text_cfg):
            if self.text_cfg is None and self.quick_gelu and self.context_length == 77:
                return {"target": HF_CLIP_TARGET, "params": freeze} if freeze else {"target": HF_CLIP_TARGET}
            if self.text_cfg is not None:
                cfg = self.text_cfg
                hf = {"vocab_size": cfg["vocab_size"], "hidden_size": cfg["width"], "num_attention_heads": cfg["heads"],
                      "num_hidden_layers": cfg["layers"], "max_position_embeddings": self.context_length,
                      "intermediate_size": int(cfg.get("mlp_ratio", 4) * cfg["width"]),
                      "hidden_act": "quick_gelu" if self.quick_gelu else "gelu"}
                return {"target": HF_CLIP_TARGET, "params": {"hf_config": hf, **freeze}}
        sd2 = dict(kind="open_clip", quick_gelu=False, pad_token_id=0, with_projection=True, context_length=77,
                   final_norm=True, bpe=None)
        if all(getattr(self, k) == v for k, v in sd2.items()):
            sizes = {} if self.text_cfg is None else {"text_cfg": self.text_cfg, "embed_dim": self.embed_dim}
            return {"target": OPEN_CLIP_TARGET, "params": {"arch": self.arch, "layer": self.layer, **freeze, **sizes}}
        raise InputError("this text encoder has no original-format equivalent (only SD 1.x's CLIP ViT-L and "
                         "SD 2.x-style OpenCLIP towers do); keep our format")


def _check_params(target: str, params: Mapping[str, Any], known: Sequence[str]) -> None:
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise InputError(f"{target}: unknown params {unknown}; known are {sorted(known)}")


def _open_clip(config: TextEncoderConfig, **common: Any) -> OpenCLIPTextEncoder:
    if config.text_cfg is not None:
        text_cfg = {**config.text_cfg, "context_length": config.context_length}
        return OpenCLIPTextEncoder(text_cfg, embed_dim=config.embed_dim if config.with_projection else None,
                                   quick_gelu=common.pop("quick_gelu"), **common)
    return OpenCLIPTextEncoder.from_arch(config.arch, with_projection=config.with_projection,
                                         context_length=config.context_length, **common)


def _hf_clip(config: TextEncoderConfig, **common: Any) -> HFCLIPTextEncoder:
    return HFCLIPTextEncoder(config.hf_config, layer=common["layer"], final_norm=common["final_norm"],
                             pad_token_id=common["pad_token_id"], bpe=common["bpe"])


def _small(config: TextEncoderConfig, **common: Any) -> OpenCLIPTextEncoder:
    return SmallTextEncoder(width=config.width, layers=config.layers, heads=config.heads,
                            context_length=config.context_length, **common)


# The registry: a config's `kind:` names one of these builders.
TEXT_ENCODERS = {"open_clip": _open_clip, "hf_clip": _hf_clip, "small": _small}


def build_text_encoder(config: Mapping[str, Any] | TextEncoderConfig) -> OpenCLIPTextEncoder:
    """The text encoder of a config (typed, or a dict of `TextEncoderConfig` fields)."""
    if not isinstance(config, TextEncoderConfig):
        config = TextEncoderConfig.from_dict(config)
    return TEXT_ENCODERS[config.kind](config, quick_gelu=config.quick_gelu, layer=config.layer,
                                      pad_token_id=config.pad_token_id, trainable=config.trainable,
                                      final_norm=config.final_norm, bpe=config.bpe)
