"""Typed configuration of a latent diffusion model, and readers for YAML configs.

Two YAML dialects are read:
- ours: top-level `autoencoder:` (see `AutoencoderConfig`) and `diffusion:` (see `LDMConfig`);
- the original LDM / Stable Diffusion style (`model.params.first_stage_config.params.ddconfig`,
  `embed_dim`, `scale_factor`, `parameterization`, `linear_start`, ...), read so that original
  checkpoints load with the config file that came with them.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from autoencoder.config import AutoencoderConfig, check_keys, coerce_numbers
from autoencoder.errors import InputError

from .diffusion import PARAMETERIZATIONS
from .schedule import BETA_SCHEDULES


@dataclass
class LDMConfig:
    """Everything needed to rebuild a `LatentDiffusion`; travels inside our checkpoints."""

    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    parameterization: str = "eps"
    timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    linear_start: float = 0.00085
    linear_end: float = 0.012
    zero_terminal_snr: bool = False   # rescale the schedule to SNR 0 at the last step (Lin et al. 2023)
    image_size: int | None = None     # native latent size (64 for SD 1.x: 512 px); None: the autoencoder's
    # Filled in by the denoiser / text-conditioning parts; None means "not part of this model".
    denoiser: dict[str, Any] | None = None
    text_encoder: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.autoencoder, dict):
            self.autoencoder = AutoencoderConfig.from_dict(self.autoencoder)
        coerce_numbers(self, "model")
        if self.parameterization not in PARAMETERIZATIONS:
            raise InputError(f"parameterization {self.parameterization!r} is not one of {', '.join(PARAMETERIZATIONS)}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise InputError(f"beta_schedule {self.beta_schedule!r} is not one of {', '.join(BETA_SCHEDULES)}")
        if self.timesteps < 1:
            raise InputError(f"timesteps must be >= 1, got {self.timesteps}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["autoencoder"] = self.autoencoder.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LDMConfig":
        check_keys(cls, d, "model")
        return cls(**d)


def _original_first_stage(params: dict[str, Any]) -> dict[str, Any]:
    """The autoencoder part of an original config: `ddconfig` + `embed_dim`."""
    if "ddconfig" not in params or "embed_dim" not in params:
        raise InputError("original config: the first stage needs params.ddconfig and params.embed_dim")
    return {**params["ddconfig"], "embed_dim": params["embed_dim"]}


def from_original_config(raw: dict[str, Any]) -> LDMConfig:
    """Read an original LDM / SD YAML (already parsed) into an `LDMConfig`.

    Accepts a full LatentDiffusion config (`model.params.first_stage_config`) or an original
    autoencoder config (`model.target: ...AutoencoderKL` with `params.ddconfig`).
    """
    model = raw.get("model", raw)
    params = model.get("params", {}) if isinstance(model, dict) else {}
    target = str(model.get("target", "")) if isinstance(model, dict) else ""
    if "first_stage_config" in params:
        first_stage = params["first_stage_config"]
        fs_target = str(first_stage.get("target", ""))
        if fs_target and not fs_target.endswith("AutoencoderKL"):
            raise InputError(f"original config: first stage {fs_target} is not supported; only AutoencoderKL")
        ae = _original_first_stage(first_stage.get("params", {}))
    elif target.endswith("AutoencoderKL") or "ddconfig" in params:
        ae = _original_first_stage(params)
    else:
        raise InputError("original config: found neither model.params.first_stage_config nor an "
                         "AutoencoderKL model.params.ddconfig; is this an LDM / Stable Diffusion config?")
    # The original LatentDiffusion defaults scale_factor to 1.0; SD configs set 0.18215.
    ae["scale_factor"] = float(params.get("scale_factor", 1.0))
    schedule = params.get("beta_schedule", "linear")
    # The original "linear" schedule is linear in sqrt(beta): our "scaled_linear".
    schedule = {"linear": "scaled_linear", "sqrt_linear": "linear"}.get(schedule, schedule)
    return LDMConfig(
        autoencoder=AutoencoderConfig.from_dict(ae),
        parameterization=params.get("parameterization", "eps"),
        timesteps=int(params.get("timesteps", 1000)),
        beta_schedule=schedule,
        linear_start=float(params.get("linear_start", 0.00085)),
        linear_end=float(params.get("linear_end", 0.012)),
        image_size=int(params["image_size"]) if "image_size" in params else None,
        denoiser=_original_section(params, "unet_config"),
        text_encoder=_original_section(params, "cond_stage_config"),
    )


def _original_section(params: dict[str, Any], key: str) -> dict[str, Any] | None:
    section = params.get(key)
    if not section or str(section.get("target", "")) == "torch.nn.Identity":
        return None
    return {"original": section}


def is_original_config(raw: dict[str, Any]) -> bool:
    return "model" in raw and isinstance(raw["model"], dict) and ("target" in raw["model"] or "params" in raw["model"])


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InputError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise InputError(f"config file {path} must hold a mapping at the top level")
    return raw


def load_ldm_config(config: "str | Path | dict[str, Any] | LDMConfig") -> LDMConfig:
    """An `LDMConfig` from a YAML path, a parsed dict (ours or original style) or an LDMConfig."""
    if isinstance(config, LDMConfig):
        return config
    raw = read_yaml(config) if isinstance(config, (str, Path)) else config
    if is_original_config(raw):
        return from_original_config(raw)
    if "autoencoder" in raw:
        diffusion = dict(raw.get("diffusion") or {})
        return LDMConfig.from_dict({"autoencoder": raw["autoencoder"], **diffusion,
                                    **{k: raw[k] for k in ("denoiser", "text_encoder") if k in raw}})
    raise InputError("model config: expected an original LDM config (model.params...) or ours "
                     "(top-level 'autoencoder:' and 'diffusion:')")
