"""The sgm dialect (Stability-AI generative-models, SDXL): its configs, and SDXL files recognised by their keys.

- `from_sgm_config(raw)`: an sgm YAML (`model.params.network_config`, `conditioner_config`,
  `first_stage_config`, `denoiser_config`, `scale_factor`), as in sgm's `configs/inference/sd_xl_base.yaml`,
  -> `LDMConfig`. `denoiser.sigmas` of a `DiscreteDenoiser` is derived from the schedule, so it is not read.
- `infer_sgm_config(tensors)`: the sgm config of an SDXL base / refiner / inpainting file (UNet widths,
  input channels, context and vector widths read off the weights), for files that come without one.

Text embedders beyond sgm's own params (to describe towers other than the released ones, e.g. a tiny test
model or a diffusers folder's `config.json`): `FrozenCLIPEmbedder` takes `hf_config` (CLIPTextConfig sizes)
and `FrozenOpenCLIPEmbedder2` takes `text_cfg` + `embed_dim` (open_clip's); both take `bpe`, a tokenizer
merges file.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping

import torch

from autoencoder.config import AutoencoderConfig
from common.errors import InputError
from ldm.conditioner import SIZE_INPUTS, ConditionerConfig
from ldm.config import LDMConfig
from ldm.denoisers.unet import UNetConfig
from ldm.text import TextEncoderConfig
from ldm.text.hf_clip import HFCLIPConfig
from ldm.text.tokenizer import special_tokens

_ENCODERS = "sgm.modules.encoders.modules."
CLIP_EMBEDDER, OPEN_CLIP_EMBEDDER, SIZE_EMBEDDER = (_ENCODERS + "FrozenCLIPEmbedder", _ENCODERS + "FrozenOpenCLIPEmbedder2",
                                                    _ENCODERS + "ConcatTimestepEmbedderND")
UNET_TARGET = "sgm.modules.diffusionmodules.openaimodel.UNetModel"
_SCALINGS = {"EpsScaling": "eps", "VScaling": "v"}  # sgm.modules.diffusionmodules.denoiser_scaling
SDXL_LATENT_SIZE = 128  # SDXL's native 1024 x 1024 pixels at the VAE's factor 8 (sgm configs do not say)


def is_sgm_config(raw: Mapping[str, Any]) -> bool:
    model = raw.get("model", raw)
    return isinstance(model, Mapping) and isinstance(model.get("params"), Mapping) and "network_config" in model["params"]


def from_sgm_config(raw: Mapping[str, Any]) -> LDMConfig:
    """An sgm `DiffusionEngine` config (parsed YAML) as an `LDMConfig`; the samplers default to sgm's spacing."""
    params = raw.get("model", raw)["params"]
    network = params["network_config"]
    if network.get("target") != UNET_TARGET:
        raise InputError(f"sgm config: network {network.get('target')!r} is not supported; only {UNET_TARGET}")
    # sgm's UNet always has spatial transformers and no legacy head rule (both were dropped from its configs)
    unet = UNetConfig.from_original({"use_spatial_transformer": True, "legacy": False, **(network.get("params") or {})})
    parameterization, linear = _denoiser(params.get("denoiser_config") or {})
    conditioner = params.get("conditioner_config")
    return LDMConfig(
        autoencoder=AutoencoderConfig.from_dict({**_first_stage(params.get("first_stage_config") or {}),
                                                 "scale_factor": float(params.get("scale_factor", 1.0))}),
        parameterization=parameterization, beta_schedule="scaled_linear", timesteps=linear["num_timesteps"],
        linear_start=linear["linear_start"], linear_end=linear["linear_end"],
        denoiser=unet, text_encoder=None if conditioner is None else _conditioner(conditioner),
        image_size=int(params.get("image_size", SDXL_LATENT_SIZE)),
        # ours, beside sgm's keys (a diffusers folder's scheduler settings); sgm's own spacing by default
        timestep_spacing=params.get("timestep_spacing", "sgm"),
        zero_terminal_snr=bool(params.get("zero_terminal_snr", False)))


def _denoiser(section: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(parameterization, LegacyDDPMDiscretization params) of a `DiscreteDenoiser` section."""
    target = str(section.get("target", "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser"))
    if not target.endswith(".DiscreteDenoiser"):
        raise InputError(f"sgm config: denoiser {target} is not supported; only DiscreteDenoiser (SDXL's)")
    params = section.get("params") or {}
    scaling = str((params.get("scaling_config") or {}).get("target", "EpsScaling")).rsplit(".", 1)[-1]
    if scaling not in _SCALINGS:
        raise InputError(f"sgm config: scaling {scaling} is not supported; only {', '.join(_SCALINGS)}")
    discretization = params.get("discretization_config") or {}
    if not str(discretization.get("target", "LegacyDDPMDiscretization")).endswith("LegacyDDPMDiscretization"):
        raise InputError(f"sgm config: discretization {discretization.get('target')} is not supported; only "
                         "LegacyDDPMDiscretization")
    linear = {"linear_start": 0.00085, "linear_end": 0.012, "num_timesteps": int(params.get("num_idx", 1000)),
              **(discretization.get("params") or {})}
    return _SCALINGS[scaling], linear


def _first_stage(section: Mapping[str, Any]) -> dict[str, Any]:
    """AutoencoderConfig fields of sgm's first stage: `ddconfig` + `embed_dim` (0.1.0), or the newer
    `encoder_config.params` + `embed_dim`."""
    params = section.get("params") or {}
    ddconfig = params.get("ddconfig") or (params.get("encoder_config") or {}).get("params")
    if not ddconfig or "embed_dim" not in params:
        raise InputError("sgm config: first_stage_config needs params.ddconfig (or encoder_config) and embed_dim")
    ddconfig = dict(ddconfig)
    attention = ddconfig.pop("attn_type", "vanilla")
    if attention not in ("vanilla", "vanilla-xformers"):
        raise InputError(f"sgm config: first stage attn_type {attention!r} is not supported; only vanilla")
    return {**ddconfig, "embed_dim": params["embed_dim"]}


def _conditioner(section: Mapping[str, Any]) -> ConditionerConfig:
    """ConditionerConfig of a `GeneralConditioner` section: the text embedders, then the size embedders."""
    text, sizes, size_dim, pooled = [], [], None, -1
    for i, embedder in enumerate((section.get("params") or {}).get("emb_models") or []):
        target, params = embedder.get("target"), embedder.get("params") or {}
        if target == SIZE_EMBEDDER:
            key = embedder.get("input_key")
            if key not in SIZE_INPUTS or (size_dim is not None and params.get("outdim") != size_dim):
                raise InputError(f"sgm config: size embedder {i} ({key}, outdim {params.get('outdim')}) is not "
                                 f"supported; known inputs {list(SIZE_INPUTS)}, all of one outdim")
            sizes.append(key)
            size_dim = params.get("outdim")
            continue
        if sizes:
            raise InputError("sgm config: text embedders must come before the size embedders (as in SDXL)")
        if target == OPEN_CLIP_EMBEDDER and params.get("always_return_pooled", False):
            pooled = len(text)
        text.append(_text_embedder(target, params))
    if not text:
        raise InputError("sgm config: the conditioner has no text embedder")
    # sgm's inference API zeros the unconditional text of SDXL base; the refiner (the only one that takes an
    # aesthetic score) encodes the negative prompt instead (`is_legacy`).
    return ConditionerConfig(text=text, pooled=pooled, size_inputs=tuple(sizes), size_dim=size_dim or 256,
                             zero_uncond="aesthetic_score" not in sizes)


def _text_embedder(target: str, params: Mapping[str, Any]) -> TextEncoderConfig:
    bpe = params.get("bpe")
    if target == CLIP_EMBEDDER:
        version = str(params.get("version", "openai/clip-vit-large-patch14"))
        if "hf_config" not in params and not version.endswith("clip-vit-large-patch14"):
            raise InputError(f"sgm config: FrozenCLIPEmbedder version {version!r} is not supported; only "
                             "openai/clip-vit-large-patch14 (or give hf_config)")
        hf_config = dict(params.get("hf_config") or {})
        layers = hf_config.get("num_hidden_layers", 12)
        layer = params.get("layer", "last")
        if layer == "hidden" and params.get("layer_idx") == layers - 1:
            layer, final_norm = "penultimate", False  # hidden_states[n - 1]: no final_layer_norm
        elif layer == "last":
            final_norm = True
        else:
            raise InputError(f"sgm config: FrozenCLIPEmbedder layer {layer!r} (layer_idx {params.get('layer_idx')}) "
                             f"is not supported; only 'last' or 'hidden' with layer_idx {layers - 1}")
        return TextEncoderConfig(kind="hf_clip", hf_config=hf_config, layer=layer, final_norm=final_norm,
                                 pad_token_id=special_tokens(bpe)[1], with_projection=False, bpe=bpe)
    if target == OPEN_CLIP_EMBEDDER:
        if params.get("legacy", True):
            raise InputError("sgm config: FrozenOpenCLIPEmbedder2 with legacy=True is not supported (SDXL: False)")
        layer = params.get("layer", "last")
        if layer not in ("last", "penultimate"):
            raise InputError(f"sgm config: FrozenOpenCLIPEmbedder2 layer {layer!r} is not one of last, penultimate")
        sizes = ({"text_cfg": dict(params["text_cfg"]), "embed_dim": params.get("embed_dim")}
                 if "text_cfg" in params else {"arch": params.get("arch", "ViT-H-14")})
        return TextEncoderConfig(kind="open_clip", layer=layer, final_norm=False, pad_token_id=0, bpe=bpe,
                                 trainable=not params.get("freeze", True), **sizes)
    raise InputError(f"sgm config: embedder {target!r} is not supported; supported: FrozenCLIPEmbedder, "
                     "FrozenOpenCLIPEmbedder2, ConcatTimestepEmbedderND")


# sgm's configs/inference/sd_xl_base.yaml and sd_xl_refiner.yaml (model part; attention kernels left out).
def _sizes(*keys: str) -> list[dict[str, Any]]:
    return [{"is_trainable": False, "input_key": key, "target": SIZE_EMBEDDER, "params": {"outdim": 256}} for key in keys]


_BIG_G = {"is_trainable": False, "input_key": "txt", "target": OPEN_CLIP_EMBEDDER,
          "params": {"arch": "ViT-bigG-14", "version": "laion2b_s39b_b160k", "freeze": True, "layer": "penultimate",
                     "always_return_pooled": True, "legacy": False}}
_CLIP_L = {"is_trainable": False, "input_key": "txt", "target": CLIP_EMBEDDER,
           "params": {"layer": "hidden", "layer_idx": 11}}
_VAE = {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": {
    "embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                                 "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                                 "dropout": 0.0}}}
_DENOISER = {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", "params": {
    "num_idx": 1000, "scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"},
    "discretization_config": {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}}}
SDXL_BASE = {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
    "scale_factor": 0.13025, "denoiser_config": _DENOISER, "first_stage_config": _VAE,
    "network_config": {"target": UNET_TARGET, "params": {
        "adm_in_channels": 2816, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
        "model_channels": 320, "attention_resolutions": [4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 4],
        "num_head_channels": 64, "use_linear_in_transformer": True, "transformer_depth": [1, 2, 10],
        "context_dim": 2048}},
    "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
        _CLIP_L, _BIG_G, *_sizes("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")]}}}}}
SDXL_REFINER = {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
    "scale_factor": 0.13025, "denoiser_config": _DENOISER, "first_stage_config": _VAE,
    "network_config": {"target": UNET_TARGET, "params": {
        "adm_in_channels": 2560, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
        "model_channels": 384, "attention_resolutions": [4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
        "num_head_channels": 64, "use_linear_in_transformer": True, "transformer_depth": 4, "context_dim": 1280}},
    "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
        _BIG_G, *_sizes("original_size_as_tuple", "crop_coords_top_left", "aesthetic_score")]}}}}}

_UNET = "model.diffusion_model."


def is_sdxl_file(tensors: Mapping[str, torch.Tensor]) -> bool:
    """An sgm-layout file: its text conditioning is under `conditioner.embedders.*`."""
    return any(k.startswith("conditioner.embedders.") for k in tensors)


def infer_sgm_config(tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The sgm config of an SDXL base (CLIP-L + bigG), refiner (bigG alone) or inpainting (9 input channels)
    file, with the UNet's widths and the conditioning widths read off the weights."""
    if f"{_UNET}input_blocks.0.0.weight" not in tensors or f"{_UNET}label_emb.0.0.weight" not in tensors:
        raise InputError("this file has SDXL text encoders (conditioner.embedders.*) but no SDXL UNet "
                         f"({_UNET}label_emb.0.0.weight); pass config=, the sgm YAML it came with")
    refiner = "conditioner.embedders.0.model.ln_final.weight" in tensors
    config = copy.deepcopy(SDXL_REFINER if refiner else SDXL_BASE)
    unet = config["model"]["params"]["network_config"]["params"]
    conv_in = tensors[f"{_UNET}input_blocks.0.0.weight"]
    unet["model_channels"], unet["in_channels"] = int(conv_in.shape[0]), int(conv_in.shape[1])
    unet["adm_in_channels"] = int(tensors[f"{_UNET}label_emb.0.0.weight"].shape[1])
    to_k = tensors.get(f"{_UNET}input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight")
    if to_k is not None:
        unet["context_dim"] = int(to_k.shape[1])
    return config


def to_sgm_config(config: LDMConfig) -> dict[str, Any]:
    """The sgm config (as a dict) of an SDXL-style `LDMConfig`: `from_sgm_config`'s inverse, for writing files in
    the original layout. Keys beyond sgm's (tower sizes, `bpe`, a spacing other than sgm's) are ours."""
    if config.beta_schedule != "scaled_linear" or not isinstance(config.denoiser, UNetConfig):
        raise InputError("only a UNet on SD's scaled_linear schedule has an sgm equivalent; keep our format")
    scaling = {v: k for k, v in _SCALINGS.items()}.get(config.parameterization)
    if scaling is None:
        raise InputError(f"sgm has no {config.parameterization}-parameterization denoiser; keep our format")
    ae = config.autoencoder.to_dict()
    params: dict[str, Any] = {
        "scale_factor": ae.pop("scale_factor"),
        "denoiser_config": {"target": _DENOISER["target"], "params": {
            "num_idx": config.timesteps,
            "scaling_config": {"target": f"sgm.modules.diffusionmodules.denoiser_scaling.{scaling}"},
            "discretization_config": {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization",
                                      "params": {"linear_start": config.linear_start, "linear_end": config.linear_end}}}},
        "network_config": {"target": UNET_TARGET, "params": {
            k: v for k, v in config.denoiser.to_dict().items() if v is not None}},
        "first_stage_config": {"target": _VAE["target"], "params": {"embed_dim": ae.pop("embed_dim"), "ddconfig": ae}},
    }
    if isinstance(config.text_encoder, ConditionerConfig):
        params["conditioner_config"] = {"target": "sgm.modules.GeneralConditioner",
                                        "params": {"emb_models": _sgm_embedders(config.text_encoder)}}
    if config.timestep_spacing not in (None, "sgm"):
        params["timestep_spacing"] = config.timestep_spacing
    if config.zero_terminal_snr:
        params["zero_terminal_snr"] = True
    if config.image_size not in (None, SDXL_LATENT_SIZE):
        params["image_size"] = config.image_size
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": params}}


def _sgm_embedders(conditioner: ConditionerConfig) -> list[dict[str, Any]]:
    embedders = []
    pooled = conditioner.pooled % len(conditioner.text)
    for i, text in enumerate(conditioner.text):
        extra = {"bpe": text.bpe} if text.bpe else {}
        if text.kind == "hf_clip":
            hf = dataclasses.asdict(text.hf_config)
            layer = ({"layer": "hidden", "layer_idx": hf["num_hidden_layers"] - 1}
                     if text.layer == "penultimate" and not text.final_norm else {"layer": "last"})
            sizes = {} if hf == dataclasses.asdict(HFCLIPConfig()) else {"hf_config": hf}
            params = {**layer, **sizes, **extra}
            embedders.append({"is_trainable": False, "input_key": "txt", "target": CLIP_EMBEDDER, "params": params})
        elif text.kind == "open_clip" and not text.final_norm:
            sizes = ({"arch": text.arch} if text.text_cfg is None
                     else {"text_cfg": text.text_cfg, "embed_dim": text.embed_dim})
            params = {**sizes, "freeze": not text.trainable, "layer": text.layer, "always_return_pooled": i == pooled,
                      "legacy": False, **extra}
            embedders.append({"is_trainable": bool(text.trainable), "input_key": "txt", "target": OPEN_CLIP_EMBEDDER,
                              "params": params})
        else:
            raise InputError(f"a {text.kind} text encoder (final_norm={text.final_norm}) has no sgm embedder; keep our "
                             "format")
    return embedders + [{"is_trainable": False, "input_key": key, "target": SIZE_EMBEDDER,
                         "params": {"outdim": conditioner.size_dim}} for key in conditioner.size_inputs]
