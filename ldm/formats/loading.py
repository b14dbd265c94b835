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
from ldm.formats.diffusers import is_diffusers_folder, read_diffusers_folder
from ldm.formats.diffusers_keys import LOGIT_SCALE
from ldm.formats.original_configs import infer_original_config
from ldm.formats.sgm import from_sgm_config, infer_sgm_config, is_sdxl_file
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
_IGNORED_ORIGINAL = ("denoiser.sigmas",)  # sgm's DiscreteDenoiser table: derived from the schedule
# Tensors some files leave out that hold no learned weight: HF CLIP's position_ids (0..n-1; not saved since
# transformers 4.31) and CLIP's logit_scale (unused by every text-to-image model; the value of released SDXL).
_OPTIONAL = {"position_ids": lambda current: current, "logit_scale": lambda current: torch.tensor(LOGIT_SCALE)}


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
    - a diffusers-format folder (`model_index.json`, `unet/`, `vae/`, ...; SD 1.x / 2.x / XL): read with its
      config.json files by `ldm.formats.diffusers.read_diffusers_folder`.
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
    if is_diffusers_folder(path):  # a diffusers folder: its parts under the original names, with an original config
        tensors, raw = read_diffusers_folder(path)
        metadata: dict[str, str] = {}
        config = raw if config is None else config
    else:
        tensors, metadata = read_checkpoint(path)
    ours = metadata.get("format") == FORMAT
    if config is not None:
        ldm_config = _config_for(config, tensors)
    elif ours and "config" in metadata:
        ldm_config = _config_from_metadata(metadata, source=str(path))
    elif _is_autoencoder_only(tensors):
        raise InputError(f"{path} is an original first-stage checkpoint with no embedded config: pass config=, "
                         "the YAML it came with (e.g. configs/autoencoder/kl-f8.yaml for the SD autoencoder)")
    elif is_sdxl_file(tensors):
        ldm_config = from_sgm_config(infer_sgm_config(tensors))
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


def _config_from_metadata(metadata: dict[str, str], source: str = "checkpoint") -> LDMConfig:
    """The config our checkpoints carry as JSON (`metadata["config"]`), checked before anything is built: malformed
    JSON, a config that is no object, and sizes outside the configs' bounds (`check_range`) are one-line
    InputErrors naming `source` (the file)."""
    fix = ("pass the model's config (--config YAML, or config= in Python), or re-save the file with it: "
           "tools/convert_checkpoint.py IN OUT --config YAML")
    try:
        config = json.loads(metadata["config"])
    except (ValueError, RecursionError) as exc:  # JSONDecodeError; numbers of over 4300 digits; deep nesting
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{source}: the config in this checkpoint's metadata is not valid JSON ({reason}): the "
                         f"file is damaged; {fix}") from None
    if not isinstance(config, dict):
        what = "null" if config is None else f"a JSON {type(config).__name__.replace('str', 'string')}"
        raise InputError(f"{source}: the config in this checkpoint's metadata is {what}, not a JSON object of "
                         f"settings: the file is damaged; {fix}")
    try:
        if metadata.get("kind") == "autoencoder":
            return LDMConfig(autoencoder=AutoencoderConfig.from_dict(config))
        return ldm_config_from_dict(config)
    except InputError as exc:
        raise InputError(f"{source}: the config in this checkpoint's metadata is refused: {exc}") from None
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError, RecursionError) as exc:
        # A shape of config no check foresaw (a list where a number goes, ...): still one line, not a traceback.
        raise InputError(f"{source}: the config in this checkpoint's metadata does not describe a model "
                         f"({type(exc).__name__}: {str(exc)[:200]}); {fix}") from None


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
                      # SD 1.x/2.x keep the text encoder under cond_stage_model., SDXL (sgm) under conditioner.
                      "conditioner." if is_sdxl_file(tensors) else "cond_stage_model.": "text_encoder"})
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
        if weights:
            weights = _with_optional_tensors(module, weights)
        load_state_dict_checked(module, weights, source=f"{source} ({part})", assign=True)
    if "alphas_cumprod" in tensors:
        if tensors["alphas_cumprod"].shape != model.alphas_cumprod.shape:
            raise InputError(f"{source}: alphas_cumprod has {tensors['alphas_cumprod'].numel()} steps but the config "
                             f"says timesteps={model.config.timesteps}")
        model.alphas_cumprod.copy_(tensors["alphas_cumprod"])
        claimed.add("alphas_cumprod")
    ignored = () if ours else _IGNORED_ORIGINAL
    leftover = [k for k in tensors if k not in claimed and k not in _SCHEDULE_BUFFERS and k not in ignored
                and not k.startswith(_IGNORED_PREFIXES)]
    if leftover:
        raise InputError(f"{source}: unexpected keys that belong to no part of the model: {', '.join(leftover[:5])}"
                         + (f" (+{len(leftover) - 5} more)" if len(leftover) > 5 else ""))


def _with_optional_tensors(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` with the `_OPTIONAL` tensors the module has and the file left out filled in."""
    missing = {}
    for name, current in module.state_dict(keep_vars=True).items():
        fill = _OPTIONAL.get(name.rsplit(".", 1)[-1])
        if fill is not None and name not in weights:
            missing[name] = fill(current)
    return {**weights, **missing} if missing else weights


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
