"""Text conditioning: the text-encoder config (its `kind` is the registry's choice) and the builder.

    prompt -> tokenizer (`tokenizer.py`) -> text encoder (`encoders.py`) -> context (B, tokens, width)

Checkpoint key maps for text towers (open_clip files, SD 1.x's Hugging Face CLIP) are in `keymaps.py`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from common.config import check_keys, coerce_numbers
from common.errors import InputError
from ldm.text.encoders import LAYERS, OpenCLIPTextEncoder, SmallTextEncoder
from ldm.text.tokenizer import EOT_TOKEN, VOCAB_SIZE

OPEN_CLIP_TARGET = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"  # SD 2.x
HF_CLIP_TARGET = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"  # SD 1.x
ORIGINAL_TARGETS = (OPEN_CLIP_TARGET, HF_CLIP_TARGET)


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
        if self.kind not in TEXT_ENCODERS:
            raise InputError(f"text_encoder kind {self.kind!r} is not one of {', '.join(TEXT_ENCODERS)}")
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

    def to_original(self) -> dict[str, Any]:
        """The original `cond_stage_config` this config reads from (`from_original`'s inverse)."""
        sd1 = dict(kind="open_clip", arch="ViT-L-14", layer="last", quick_gelu=True, pad_token_id=EOT_TOKEN,
                   with_projection=False, context_length=77)
        freeze = {} if not self.trainable else {"freeze": False}
        if all(getattr(self, k) == v for k, v in sd1.items()):
            return {"target": HF_CLIP_TARGET, "params": freeze} if freeze else {"target": HF_CLIP_TARGET}
        sd2 = dict(kind="open_clip", quick_gelu=False, pad_token_id=0, with_projection=True, context_length=77)
        if all(getattr(self, k) == v for k, v in sd2.items()):
            return {"target": OPEN_CLIP_TARGET, "params": {"arch": self.arch, "layer": self.layer, **freeze}}
        raise InputError("this text encoder has no original-format equivalent (only SD 1.x's CLIP ViT-L and "
                         "SD 2.x-style OpenCLIP towers do); keep our format")


def _check_params(target: str, params: Mapping[str, Any], known: Sequence[str]) -> None:
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise InputError(f"{target}: unknown params {unknown}; known are {sorted(known)}")


def _open_clip(config: TextEncoderConfig, **common: Any) -> OpenCLIPTextEncoder:
    return OpenCLIPTextEncoder.from_arch(config.arch, with_projection=config.with_projection,
                                         context_length=config.context_length, **common)


def _small(config: TextEncoderConfig, **common: Any) -> OpenCLIPTextEncoder:
    return SmallTextEncoder(width=config.width, layers=config.layers, heads=config.heads,
                            context_length=config.context_length, **common)


# The registry: a config's `kind:` names one of these builders.
TEXT_ENCODERS = {"open_clip": _open_clip, "small": _small}


def build_text_encoder(config: Mapping[str, Any] | TextEncoderConfig) -> OpenCLIPTextEncoder:
    """The text encoder of a config (typed, or a dict of `TextEncoderConfig` fields)."""
    if not isinstance(config, TextEncoderConfig):
        config = TextEncoderConfig.from_dict(config)
    return TEXT_ENCODERS[config.kind](config, quick_gelu=config.quick_gelu, layer=config.layer,
                                      pad_token_id=config.pad_token_id, trainable=config.trainable)
