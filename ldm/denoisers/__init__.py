"""The denoisers: networks `forward(x, t, context, y=None) -> output`, and the registry that builds them.

`DENOISERS` is the registry: a config's `type:` names one of its entries (config class, network
class). A new denoiser is one module and one entry here; members never import each other (shared
pieces live in `embeddings.py`, `attention.py` and `conv.py`).
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from common.errors import InputError
from ldm.denoisers.dit import DiT, DiTConfig
from ldm.denoisers.unet import UNetConfig, UNetModel

DenoiserConfig = UNetConfig | DiTConfig

DENOISERS: dict[str, tuple[type, type[nn.Module]]] = {
    "unet": (UNetConfig, UNetModel),
    "dit": (DiTConfig, DiT),
}


def denoiser_type(config: DenoiserConfig) -> str:
    """The registry name of a config object ("unet", "dit")."""
    for name, (config_class, _) in DENOISERS.items():
        if isinstance(config, config_class):
            return name
    raise InputError(f"{type(config).__name__} is not a denoiser config; use one of {sorted(DENOISERS)}")


def denoiser_config(config: Mapping[str, Any] | DenoiserConfig) -> DenoiserConfig:
    """A typed denoiser config from `{"type": "unet", ...fields}` (ours) or a config object."""
    if isinstance(config, DenoiserConfig):
        return config
    fields = dict(config)
    kind = fields.pop("type", None)
    if kind not in DENOISERS:
        raise InputError(f"denoiser type {kind!r} is unknown; choose one of {sorted(DENOISERS)}")
    return DENOISERS[kind][0].from_dict(fields)


def denoiser_to_dict(config: DenoiserConfig) -> dict[str, Any]:
    """`{"type": name, ...fields}`: the form `denoiser_config` reads back (and our checkpoints store)."""
    return {"type": denoiser_type(config), **config.to_dict()}


def build_denoiser(config: Mapping[str, Any] | DenoiserConfig) -> nn.Module:
    """The network of a denoiser config (typed, or a dict with `type:`)."""
    config = denoiser_config(config)
    return DENOISERS[denoiser_type(config)][1](config)
