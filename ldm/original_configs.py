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

from autoencoder.errors import InputError

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
        raise InputError("cannot infer the architecture: this checkpoint has no Stable Diffusion UNet "
                         f"({_UNET}input_blocks.0.0.weight); pass config=, the YAML it came with")
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
