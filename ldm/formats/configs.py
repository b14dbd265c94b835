"""Config dialects, translated into a typed `LDMConfig` at the loading boundary.

- ours: a YAML with top-level `autoencoder:`, `diffusion:` (`LDMConfig` fields), `denoiser:`
  (`type:` + fields) and `text_encoder:`; and the JSON inside our checkpoints;
- the original LDM / Stable Diffusion YAML (`model.params.first_stage_config.params.ddconfig`,
  `unet_config`, `cond_stage_config`, `scale_factor`, `linear_start`, ...), read so that original
  checkpoints load with the config file that came with them;
- sgm's YAML (SDXL; `ldm.formats.sgm`);
- checkpoints of ours written before the sections were typed, whose `denoiser` / `text_encoder`
  hold `{"original": <unet_config or cond_stage_config>}`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from autoencoder.config import AutoencoderConfig
from common.config import read_yaml
from common.errors import InputError
from ldm.config import LDMConfig
from ldm.denoisers import UNetConfig
from ldm.formats.sgm import from_sgm_config, is_sgm_config
from ldm.text import TextEncoderConfig

ORIGINAL_UNET_TARGETS = ("ldm.modules.diffusionmodules.openaimodel.UNetModel",)


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
        # ours, beside the original keys (diffusers folders' scheduler settings)
        timestep_spacing=params.get("timestep_spacing"), zero_terminal_snr=bool(params.get("zero_terminal_snr", False)),
        denoiser=_translated(params.get("unet_config"), original_unet_config),
        text_encoder=_translated(params.get("cond_stage_config"), TextEncoderConfig.from_original),
    )


def _translated(section: Mapping[str, Any] | None, translate):
    if not section or str(section.get("target", "")) == "torch.nn.Identity":
        return None
    return translate(section)


def original_unet_config(section: Mapping[str, Any]) -> UNetConfig:
    """An original `unet_config` section (`target` + `params`) as a `UNetConfig`."""
    target = (section or {}).get("target")
    if target not in ORIGINAL_UNET_TARGETS:
        raise InputError(f"original denoiser {target!r} is not supported; supported: {list(ORIGINAL_UNET_TARGETS)}")
    return UNetConfig.from_original(section.get("params") or {})


def ldm_config_from_dict(d: Mapping[str, Any]) -> LDMConfig:
    """`LDMConfig.from_dict`, also for dicts whose sections hold `{"original": section}` (our checkpoints
    written before the sections were typed, and hand-written configs in that form)."""
    d = dict(d)
    for key, translate in (("denoiser", original_unet_config), ("text_encoder", TextEncoderConfig.from_original)):
        section = d.get(key)
        if isinstance(section, Mapping) and "original" in section:
            if len(section) != 1:
                raise InputError(f"{key} config: 'original' takes no other keys, got {sorted(section)}")
            d[key] = translate(section["original"] or {})
    return LDMConfig.from_dict(d)


def is_original_config(raw: dict[str, Any]) -> bool:
    return "model" in raw and isinstance(raw["model"], dict) and ("target" in raw["model"] or "params" in raw["model"])


def load_ldm_config(config: "str | Path | dict[str, Any] | LDMConfig") -> LDMConfig:
    """An `LDMConfig` from a YAML path, a parsed dict (ours or original style) or an LDMConfig."""
    if isinstance(config, LDMConfig):
        return config
    raw = read_yaml(config) if isinstance(config, (str, Path)) else config
    if is_sgm_config(raw):
        return from_sgm_config(raw)
    if is_original_config(raw):
        return from_original_config(raw)
    if "autoencoder" in raw:
        diffusion = dict(raw.get("diffusion") or {})
        return ldm_config_from_dict({"autoencoder": raw["autoencoder"], **diffusion,
                                    **{k: raw[k] for k in ("denoiser", "text_encoder") if k in raw}})
    raise InputError("model config: expected an original LDM config (model.params...) or ours "
                     "(top-level 'autoencoder:' and 'diffusion:')")
