"""`load_model` and `save_model`: from a checkpoint file (ours or original) to a `LatentDiffusion`."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from autoencoder import AutoencoderConfig, AutoencoderKL
from common.checkpoint import (
    FORMAT,
    empty_parameters,
    load_state_dict_checked,
    read_checkpoint,
    save_checkpoint,
    strip_prefix,
)
from common.config import read_yaml
from common.errors import InputError
from ldm.config import LDMConfig
from ldm.formats.configs import from_original_config, ldm_config_from_dict, load_ldm_config
from ldm.formats.original_configs import infer_original_config
from ldm.model import LatentDiffusion
from ldm.text.keymaps import hf_clip_to_open_clip

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "weights" / "default.safetensors"  # ldm/weights/

# Original-format keys that carry no weights we use (training-time state, EMA bookkeeping, the
# schedule tables we recompute from alphas_cumprod).
_SCHEDULE_BUFFERS = ("betas", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
                     "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                     "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
                     "posterior_mean_coef2", "logvar", "lvlb_weights")
_IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.", "loss.")


def load_model(path: str | Path | None = None, config: "str | Path | dict[str, Any] | LDMConfig | None" = None,
               device: str | torch.device = "cpu", dtype: torch.dtype | None = None, *,
               parameterization: str | None = None, ema: bool = True) -> LatentDiffusion:
    """Load a `LatentDiffusion` from a checkpoint.

    - `path=None`: the embedded default model shipped with the package.
    - our `.safetensors` (config in the metadata): no `config` needed.
    - an original LDM / SD `.ckpt` or `.safetensors`: with `config`, the original-style YAML it came
      with, or without: SD 1.x / 2.x is recognised from the keys (`parameterization` "eps" / "v"
      picks between SD 2.x base and 768-v; a given value also overrides the config's).
    - an autoencoder checkpoint (ours, or an original first-stage file with its config): a model
      whose `denoiser` and `text_encoder` are None.
    With `ema` (default), a checkpoint's EMA copy of the denoiser (`model_ema.*`) is used when present.
    The weights are read once and become the parameters (no second copy in memory). The model is
    returned in eval mode with gradients off, on `device`, in `dtype` (default float32).
    """
    if path is None:
        if not DEFAULT_MODEL.is_file():
            raise InputError(f"the embedded default model is missing ({DEFAULT_MODEL}): reinstall the project "
                             "from a full clone, or pass a checkpoint path, e.g. ldm.load_model('model.safetensors') "
                             "or --ckpt model.safetensors")
        path = DEFAULT_MODEL
    tensors, metadata = read_checkpoint(path)
    ours = metadata.get("format") == FORMAT
    if config is not None:
        ldm_config = _config_for(config, tensors)
    elif ours and "config" in metadata:
        ldm_config = _config_from_metadata(metadata)
    elif _is_autoencoder_only(tensors):
        raise InputError(f"{path} is an original first-stage checkpoint with no embedded config: pass config=, "
                         "the YAML it came with (e.g. configs/autoencoder/kl-f8.yaml for the SD autoencoder)")
    else:
        ldm_config = from_original_config(infer_original_config(tensors, parameterization=parameterization))
    if parameterization is not None and ldm_config.parameterization != parameterization:
        ldm_config = dataclasses.replace(ldm_config, parameterization=parameterization)
    if ema and not ours:
        tensors = _with_ema_weights(tensors)
    with empty_parameters():
        model = LatentDiffusion(ldm_config)
    _load_weights(model, tensors, ours=ours, kind=metadata.get("kind", "latent_diffusion"), source=str(path))
    unloaded = [name for name, p in model.named_parameters() if p.is_meta]
    if unloaded:  # a part the config has but the file does not (reported by name)
        raise InputError(f"{path} has no weights for {', '.join(sorted({n.split('.')[0] for n in unloaded}))} "
                         f"(e.g. {unloaded[0]}); check that the config matches the checkpoint")
    model.eval().requires_grad_(False)
    return model.to(device=device, dtype=dtype or torch.float32)


def _with_ema_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Swap in the original EMA copy of the denoiser (`model_ema.<name without dots>`) where complete."""
    unet = [k for k in tensors if k.startswith("model.diffusion_model.")]
    ema_names = {k: "model_ema." + k[len("model."):].replace(".", "") for k in unet}
    if not unet or not all(name in tensors for name in ema_names.values()):
        return tensors
    swapped = dict(tensors)
    for key, ema_key in ema_names.items():
        swapped[key] = tensors[ema_key]
    return swapped


def _config_from_metadata(metadata: dict[str, str]) -> LDMConfig:
    config = json.loads(metadata["config"])
    if metadata.get("kind") == "autoencoder":
        return LDMConfig(autoencoder=AutoencoderConfig.from_dict(config))
    return ldm_config_from_dict(config)


def _config_for(config: Any, tensors: dict[str, torch.Tensor]) -> LDMConfig:
    raw = read_yaml(config) if isinstance(config, (str, Path)) else config
    # Our autoencoder training configs have a `model:` section of AutoencoderConfig fields.
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict) and "ch_mult" in raw["model"]:
        return LDMConfig(autoencoder=AutoencoderConfig.from_dict(raw["model"]))
    return load_ldm_config(raw)


def _is_autoencoder_only(tensors: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("encoder.") for k in tensors) and not any(k.startswith("first_stage_model.") for k in tensors)


def _load_weights(model: LatentDiffusion, tensors: dict[str, torch.Tensor], *, ours: bool, kind: str,
                  source: str) -> None:
    if kind == "autoencoder" or _is_autoencoder_only(tensors):
        weights = {k: v for k, v in tensors.items() if not k.startswith(_IGNORED_PREFIXES)}
        load_state_dict_checked(model.autoencoder, weights, source=f"{source} (autoencoder)", assign=True)
        return
    prefixes = ({"autoencoder.": "autoencoder", "denoiser.": "denoiser", "text_encoder.": "text_encoder"} if ours
                else {"first_stage_model.": "autoencoder", "model.diffusion_model.": "denoiser",
                      "cond_stage_model.": "text_encoder"})
    claimed = set()
    for prefix, part in prefixes.items():
        weights = {k: v for k, v in strip_prefix(tensors, prefix).items() if not (prefix + k).startswith(_IGNORED_PREFIXES)}
        if part == "text_encoder" and any(k.startswith("transformer.text_model.") for k in weights):
            weights = hf_clip_to_open_clip(weights)  # SD 1.x: CLIP ViT-L in Hugging Face layout
        claimed.update(prefix + k for k in strip_prefix(tensors, prefix))
        module = getattr(model, part)
        if module is None:
            if weights:
                warnings.warn(f"{source}: {len(weights)} {part} tensors ({prefix}*) were not loaded: this version "
                              f"has no {part} for this config", stacklevel=3)
            continue
        load_state_dict_checked(module, weights, source=f"{source} ({part})", assign=True)
    if "alphas_cumprod" in tensors:
        if tensors["alphas_cumprod"].shape != model.alphas_cumprod.shape:
            raise InputError(f"{source}: alphas_cumprod has {tensors['alphas_cumprod'].numel()} steps but the config "
                             f"says timesteps={model.config.timesteps}")
        model.alphas_cumprod.copy_(tensors["alphas_cumprod"])
        claimed.add("alphas_cumprod")
    leftover = [k for k in tensors if k not in claimed and k not in _SCHEDULE_BUFFERS and not k.startswith(_IGNORED_PREFIXES)]
    if leftover:
        raise InputError(f"{source}: unexpected keys that belong to no part of the model: {', '.join(leftover[:5])}"
                         + (f" (+{len(leftover) - 5} more)" if len(leftover) > 5 else ""))


def save_model(model: LatentDiffusion, path: str | Path, *, extra_metadata: dict[str, str] | None = None) -> None:
    """Write `model` as our safetensors checkpoint (config in the metadata, plus `extra_metadata`), atomically."""
    tensors = {k: v for k, v in model.state_dict().items()}
    save_checkpoint(path, tensors, {"kind": "latent_diffusion", "config": model.config.to_json(), **(extra_metadata or {})})


def save_autoencoder(autoencoder: AutoencoderKL, path: str | Path, *, extra_metadata: dict[str, Any] | None = None) -> None:
    """Write an autoencoder alone (keys as in the original first stage, config in the metadata)."""
    save_checkpoint(path, autoencoder.state_dict(),
                    {"kind": "autoencoder", "config": json.dumps(autoencoder.config.to_dict()), **(extra_metadata or {})})


def load_autoencoder(path: str | Path, config: Any = None, device: str | torch.device = "cpu",
                     dtype: torch.dtype | None = None) -> AutoencoderKL:
    """The `AutoencoderKL` of any checkpoint `load_model` reads."""
    return load_model(path, config=config, device=device, dtype=dtype).autoencoder


def model_from_training_config(section: dict[str, Any]) -> LatentDiffusion:
    """A new `LatentDiffusion` from the `model:` section of a training config (`configs/ldm/*.yaml`).

    The section is `LDMConfig` fields (`diffusion:` flattened in) with `autoencoder_ckpt:`, a trained first
    stage whose config and weights are taken, or an `autoencoder:` config with `random_autoencoder: true`:
    random weights, for tests and timing runs only, so never by default (latents of a random autoencoder
    train a model nothing can decode). The denoiser and text encoder are newly initialised (from the global
    RNG, as `torch.manual_seed` left it).
    """
    section = dict(section)
    ae_ckpt = section.pop("autoencoder_ckpt", None)
    random_autoencoder = section.pop("random_autoencoder", False)
    diffusion = dict(section.pop("diffusion", None) or {})
    if not isinstance(random_autoencoder, bool):
        raise InputError(f"model config: random_autoencoder is true or false, got {random_autoencoder!r}")
    autoencoder = None
    if ae_ckpt and random_autoencoder:
        raise InputError(f"model config: autoencoder_ckpt={ae_ckpt} and random_autoencoder=true contradict each "
                         "other; drop model.random_autoencoder to use the checkpoint")
    if ae_ckpt:
        autoencoder = load_autoencoder(ae_ckpt)
        section["autoencoder"] = autoencoder.config.to_dict()
    elif "autoencoder" not in section:
        raise InputError("model config: no autoencoder: pass model.autoencoder_ckpt=PATH (a trained autoencoder, "
                         "e.g. runs/ae/autoencoder.safetensors from tools/train_autoencoder.py)")
    elif not random_autoencoder:
        raise InputError("model config: autoencoder_ckpt is not set, so the autoencoder would have random weights "
                         "and the model could never decode what it learns: pass model.autoencoder_ckpt=PATH (a "
                         "trained autoencoder, e.g. runs/ae/autoencoder.safetensors from tools/train_autoencoder.py), "
                         "or model.random_autoencoder=true for a test or timing run")
    model = LatentDiffusion(ldm_config_from_dict({**section, **diffusion}))
    if autoencoder is not None:
        model.autoencoder.load_state_dict(autoencoder.state_dict())
    return model


def autoencoder_fingerprint(autoencoder: torch.nn.Module) -> str:
    """sha256 (hex) of an autoencoder's weights: names, shapes and float32 values in name order, so the same weights
    give the same fingerprint in any floating dtype and on any device. Latent shards record it
    (tools/encode_latents.py) and training on them checks it (tools/train_ldm.py --latents)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(autoencoder.state_dict().items()):
        tensor = tensor.detach().to("cpu", torch.float32 if tensor.is_floating_point() else tensor.dtype)
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}\n".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def autoencoder_record(model: LatentDiffusion, section: dict[str, Any]) -> dict[str, Any]:
    """What latent shards record of the autoencoder of `model`, built from the training config's `model:`
    `section`: {"sha256": its fingerprint, "scale_factor", "checkpoint": model.autoencoder_ckpt or None}."""
    return {"sha256": autoencoder_fingerprint(model.autoencoder), "scale_factor": model.scale_factor,
            "checkpoint": section.get("autoencoder_ckpt") or None}
