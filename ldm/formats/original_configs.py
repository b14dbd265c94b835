"""The original Stable Diffusion configs, and recognising which one a checkpoint needs from its keys.

`infer_original_config(tensors)` returns the original-style YAML (as a dict) of SD 1.x
(v1-inference.yaml) or SD 2.x (v2-inference(-v).yaml), with the UNet's widths, input channels and
context size read off the weights, so original files load with no config file at hand.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch

from common.errors import InputError
from ldm.conditioner import ConditionerConfig
from ldm.denoisers.unet import UNetConfig
from ldm.formats.sgm import to_sgm_config
from ldm.text import HF_CLIP_TARGET
from ldm.text.keymaps import open_clip_to_hf_clip

_FIRST_STAGE = {
    "target": "ldm.models.autoencoder.AutoencoderKL",
    "params": {"embed_dim": 4, "monitor": "val/rec_loss",
               "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                            "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                            "dropout": 0.0},
               "lossconfig": {"target": "torch.nn.Identity"}},
}

SD_V1 = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
    "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "image_size": 64, "channels": 4,
    "conditioning_key": "crossattn", "scale_factor": 0.18215, "use_ema": False, "parameterization": "eps",
    "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
        "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8,
        "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768, "use_checkpoint": True,
        "legacy": False}},
    "first_stage_config": _FIRST_STAGE,
    "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}}}}

SD_V2 = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
    "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "image_size": 96, "channels": 4,
    "conditioning_key": "crossattn", "scale_factor": 0.18215, "use_ema": False, "parameterization": "v",
    "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "use_checkpoint": True, "use_fp16": True, "image_size": 32, "in_channels": 4, "out_channels": 4,
        "model_channels": 320, "attention_resolutions": [4, 2, 1], "num_res_blocks": 2,
        "channel_mult": [1, 2, 4, 4], "num_head_channels": 64, "use_spatial_transformer": True,
        "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": 1024, "legacy": False}},
    "first_stage_config": _FIRST_STAGE,
    "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                          "params": {"freeze": True, "layer": "penultimate"}}}}}

_UNET = "model.diffusion_model."


def infer_original_config(tensors: dict[str, torch.Tensor], *, parameterization: str | None = None) -> dict[str, Any]:
    """The original config an SD 1.x / 2.x checkpoint needs, recognised from its keys and shapes."""
    if f"{_UNET}input_blocks.0.0.weight" not in tensors:
        raise InputError("this checkpoint is neither SD 1.x/2.x nor SDXL: it has no Stable Diffusion UNet "
                         f"({_UNET}input_blocks.0.0.weight); found {describe_keys(tensors)}. If it is a latent "
                         "diffusion model, pass config=, the YAML it came with")
    has_v1_text = any(k.startswith("cond_stage_model.transformer.") for k in tensors)
    has_v2_text = any(k.startswith("cond_stage_model.model.") for k in tensors)
    proj_in = tensors.get(f"{_UNET}input_blocks.1.1.proj_in.weight")
    linear_attention = proj_in is not None and proj_in.ndim == 2
    version = 2 if has_v2_text or (not has_v1_text and linear_attention) else 1
    config = copy.deepcopy(SD_V2 if version == 2 else SD_V1)
    params = config["model"]["params"]
    unet = params["unet_config"]["params"]
    conv_in = tensors[f"{_UNET}input_blocks.0.0.weight"]
    unet["model_channels"], unet["in_channels"] = int(conv_in.shape[0]), int(conv_in.shape[1])
    unet["out_channels"] = int(tensors[f"{_UNET}out.2.weight"].shape[0])
    to_k = tensors.get(f"{_UNET}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if to_k is not None:
        unet["context_dim"] = int(to_k.shape[1])
    if not (has_v1_text or has_v2_text):
        params.pop("cond_stage_config")
    if parameterization is not None:
        params["parameterization"] = parameterization
    elif version == 2:
        warnings.warn("SD 2.x checkpoint with no config: assuming v-prediction (the 768-v models); pass "
                      "parameterization='eps' for the 512 base models", stacklevel=3)
    return config


def describe_keys(tensors: dict[str, torch.Tensor]) -> str:
    """What a file holds, for an error: its top-level key prefixes with counts, e.g. "lora_unet_* (264 keys)"."""
    counts: dict[str, int] = {}
    for key in tensors:
        first = key.split(".")[0]
        parts = first.split("_")
        head = "_".join(parts[:2]) if len(parts) > 2 else first  # lora_unet_down_blocks_0 -> lora_unet
        counts[head] = counts.get(head, 0) + 1
    top = sorted(counts.items(), key=lambda item: -item[1])[:4]
    return ", ".join(f"{name}* ({n} keys)" for name, n in top) or "no tensors"


_SCHEDULE_TO_ORIGINAL = {"scaled_linear": "linear", "linear": "sqrt_linear", "cosine": "cosine"}
_PREFIXES = {"autoencoder.": "first_stage_model.", "denoiser.": "model.diffusion_model.",
             "text_encoder.": "cond_stage_model."}


def to_original_config(config) -> dict[str, Any]:
    """The original-style YAML (as a dict) of an `LDMConfig`, for writing original-format checkpoints."""
    if isinstance(config.text_encoder, ConditionerConfig):  # SDXL-style: sgm's layout
        return to_sgm_config(config)
    if config.zero_terminal_snr:
        raise InputError("a zero-terminal-SNR schedule has no original-format equivalent; keep our format")
    ae = config.autoencoder.to_dict()
    params: dict[str, Any] = {
        "parameterization": config.parameterization, "timesteps": config.timesteps,
        "beta_schedule": _SCHEDULE_TO_ORIGINAL[config.beta_schedule],
        "linear_start": config.linear_start, "linear_end": config.linear_end,
        "scale_factor": ae.pop("scale_factor"), "conditioning_key": "crossattn", "channels": ae["embed_dim"],
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": ae.pop("embed_dim"), "ddconfig": ae, "lossconfig": {"target": "torch.nn.Identity"}}},
    }
    if config.denoiser is not None:
        if not isinstance(config.denoiser, UNetConfig):
            raise InputError(f"a {type(config.denoiser).__name__} denoiser has no original-format equivalent; "
                             "keep our format")
        params["unet_config"] = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                 "params": {**config.denoiser.to_dict(), "use_spatial_transformer": True}}
    if config.text_encoder is not None:
        params["cond_stage_config"] = config.text_encoder.to_original()
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}


def to_original_state_dict(model) -> dict[str, torch.Tensor]:
    """A `LatentDiffusion`'s weights under the original names, with the 12 schedule buffers (an SDXL-style model:
    sgm's names, `conditioner.*`, and no schedule buffers, as released SDXL files)."""
    if isinstance(model.config.text_encoder, ConditionerConfig):
        names = {**_PREFIXES, "text_encoder.": "conditioner."}
        return {names[p] + k[len(p):]: v for k, v in model.state_dict().items()
                for p in names if k.startswith(p)}
    state = {}
    for key, value in model.state_dict().items():
        prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            state[_PREFIXES[prefix] + key[len(prefix):]] = value
    text = model.config.text_encoder
    if text is not None and text.to_original()["target"] == HF_CLIP_TARGET:
        # SD 1.x keeps its CLIP in Hugging Face layout
        hf = open_clip_to_hf_clip(_strip(state, "cond_stage_model."))
        state = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}
        state.update({"cond_stage_model." + k: v for k, v in hf.items()})
    schedule = model.schedule
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2"):
        state[name] = getattr(schedule, name)
    ac = schedule.alphas_cumprod.double()
    state["log_one_minus_alphas_cumprod"] = (1 - ac).log().float()
    state["sqrt_recip_alphas_cumprod"] = (1 / ac).sqrt().float()
    state["sqrt_recipm1_alphas_cumprod"] = (1 / ac - 1).sqrt().float()
    return state


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
