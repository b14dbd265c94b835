"""diffusers-format folders: `ldm.load_model(folder)` reads them; `convert_checkpoint.py --to diffusers` writes them.

A diffusers folder (`save_pretrained` of a Stable Diffusion (XL) pipeline) is `model_index.json` plus one
folder per part, each with its `config.json` and weights (`diffusion_pytorch_model[.fp16].safetensors`,
`model[.fp16].safetensors`, `.bin` or sharded with an `.index.json`): `unet/`, `vae/`, `text_encoder/`
(+ `text_encoder_2/` for SDXL), `tokenizer*/`, `scheduler/scheduler_config.json`. `read_diffusers_folder`
turns it into what an original single file holds, so loading then takes the original path: the tensors
under the original names (`diffusers_keys.py`) and an original-style config dict:

- SD 1.x / 2.x: the LDM YAML layout of `original_configs.SD_V1` / `SD_V2`. The text encoder's `hidden_act`
  tells them apart: OpenAI's CLIP (quick_gelu) is SD 1.x's `FrozenCLIPEmbedder`, kept in Hugging Face layout
  (`cond_stage_model.transformer.text_model.*`); OpenCLIP (gelu) is SD 2.x's `FrozenOpenCLIPEmbedder` in
  open_clip layout (`cond_stage_model.model.*`). diffusers keeps 23 of ViT-H's 24 blocks (SD 2.x reads the
  penultimate layer) and drops `text_projection` and `logit_scale`. We add the 24th block as zeros: a pre-LN
  residual block whose weights are all zero is the identity, so "penultimate" (ln_final of block 23's output)
  computes exactly what the folder's tower computes (and so would "last"); `text_projection` (zeros) and
  `logit_scale` (ln 100) are unused for conditioning. So the SD 2.x config and key layout hold unchanged;
  writing drops the three again. Other tower sizes (small test towers) add `params: {hf_config: {...}}`
  (SD 1.x) or `params: {text_cfg: {...}, embed_dim}` (SD 2.x) to `cond_stage_config`, as for SDXL below.
- SDXL (the UNet has `addition_embed_type: text_time`; base or refiner): sgm's layout, as in
  `tiny-sdxl/config.yaml`: `model.target: sgm.models.diffusion.DiffusionEngine` with `params.scale_factor`,
  `denoiser_config`, `network_config` (`adm_in_channels`, `num_classes: sequential`, per-level
  `transformer_depth`, ...), `conditioner_config.params.emb_models` and `first_stage_config`. The text
  embedders carry their tower sizes in keys that sgm's own configs lack:
    - `FrozenCLIPEmbedder` (text_encoder/): `params: {layer: hidden, layer_idx: N - 1, hf_config: {vocab_size,
      hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, max_position_embeddings,
      hidden_act, layer_norm_eps}}`, N = num_hidden_layers; the fields of `ldm.text.hf_clip.HFCLIPConfig`.
    - `FrozenOpenCLIPEmbedder2` (text_encoder_2/): `params: {arch: "ViT-bigG-14" (None for other sizes),
      version: None, freeze: True, layer: penultimate, always_return_pooled: True, legacy: False,
      text_cfg: {context_length, vocab_size, width, heads, layers} (+ mlp_ratio when not 4), embed_dim}`.
    - `ConcatTimestepEmbedderND`, `params: {outdim}`: input_key original_size_as_tuple, crop_coords_top_left,
      then target_size_as_tuple (base) or aesthetic_score (refiner), told by the UNet's
      projection_class_embeddings_input_dim = pooled width + outdim x (6 or 5 numbers).
  `conditioner.embedders.1.model.logit_scale` (refiner: `.0.`), absent from diffusers folders, is ln 100.
- Both layouts: `model.params.timestep_spacing` (when the scheduler config names one) and
  `model.params.zero_terminal_snr: true` (scheduler `rescale_betas_zero_snr`), which original configs have
  no key for.

Tokenizer folders are not read (prompts are tokenized with CLIP's BPE here). `write_diffusers_folder` writes
`tokenizer/` (and `tokenizer_2/`) from open_clip's CLIP BPE, for towers with CLIP's 49408-token vocabulary;
towers with another vocabulary get none (`model_index.json` lists the tokenizer as absent).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping

import torch

from common.checkpoint import read_checkpoint
from common.errors import InputError
from ldm.formats.diffusers_keys import (
    BETAS,
    DOWN,
    OPEN_CLIP_TOWERS,
    PREDICTION,
    SDXL_SIZE_INPUTS,
    UNET_CONFIG,
    UNET_FIXED,
    UP,
    VAE_CONFIG,
    VAE_FIXED,
    VIT_L,
    hf_clip_to_open_clip_tower,
    hf_clip_to_original,
    unet_to_original,
    vae_to_original,
)
from ldm.formats.diffusers_writer import check_new_folder, clip_tokenizer_files, write_diffusers_folder
from ldm.formats.original_configs import SD_V1, SD_V2
from ldm.formats.sgm import CLIP_EMBEDDER, OPEN_CLIP_EMBEDDER, SIZE_EMBEDDER, UNET_TARGET
from ldm.text import HF_CLIP_TARGET, OPEN_CLIP_TARGET

__all__ = ["check_new_folder", "clip_tokenizer_files", "is_diffusers_folder", "read_diffusers_folder",
           "translate_parts", "write_diffusers_folder"]

_PARTS = {"unet": "the denoiser", "vae": "the autoencoder", "text_encoder": "the CLIP text encoder",
          "text_encoder_2": "SDXL's OpenCLIP bigG text encoder", "scheduler": "the noise schedule"}


def is_diffusers_folder(path: str | Path) -> bool:
    """Whether `path` is a diffusers pipeline folder (a directory with `model_index.json`)."""
    path = Path(path)
    return path.is_dir() and (path / "model_index.json").is_file()


# --- reading ----------------------------------------------------------------------------------------

def read_diffusers_folder(folder: str | Path, *, variant: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors under the original single-file names, original-style config) of a diffusers folder (see the
    module docstring). `variant` picks weight files such as `*.fp16.safetensors`; by default the plain files
    are read, else the fp16 ones. A missing or broken part is a one-line InputError naming it."""
    folder = Path(folder)
    if not is_diffusers_folder(folder):
        raise InputError(f"{folder} is not a diffusers folder (a folder with model_index.json); pass the model's "
                         "folder itself, or a checkpoint file")
    index = _read_json(folder / "model_index.json", folder)
    if "unet" not in index and not (folder / "unet").is_dir():
        raise InputError(f"{folder}: {index.get('_class_name', 'this pipeline')} has no unet/; supported are Stable "
                         "Diffusion 1.x, 2.x and XL folders (UNet2DConditionModel)")
    parts = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if _listed(index, name) or name in ("unet", "vae") or (folder / name).is_dir():
            config = _read_json(folder / name / "config.json", folder)
            kind = config.get("_class_name") or (config.get("architectures") or [None])[0]
            if name == "unet" and kind not in (None, "UNet2DConditionModel"):
                raise InputError(f"{folder}: unet/ is a {kind}, not a UNet2DConditionModel; supported are Stable "
                                 "Diffusion 1.x, 2.x and XL folders")
            parts[name] = (config, _read_weights(folder, name, variant))
    scheduler = {}
    if _listed(index, "scheduler") or (folder / "scheduler").is_dir():
        scheduler = _read_json(folder / "scheduler" / "scheduler_config.json", folder)
    return translate_parts(parts, scheduler, folder)


def _listed(index: Mapping[str, Any], name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def _read_json(path: Path, folder: Path) -> dict[str, Any]:
    part = path.relative_to(folder).as_posix()
    what = _PARTS.get(path.parent.name, "")
    if not path.parent.is_dir():
        raise InputError(f"{folder}: the diffusers folder has no {path.parent.name}/ ({what}); copy the complete "
                         "model folder (model_index.json lists it)")
    if not path.is_file():
        raise InputError(f"{folder}: {part} is missing; copy the complete model folder or download {part} again")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0]
        raise InputError(f"{folder}: {part} is not valid JSON ({reason}); download it again") from None
    if not isinstance(data, dict):
        raise InputError(f"{folder}: {part} is not a JSON object of settings; download it again")
    return data


def _read_weights(folder: Path, name: str, variant: str | None) -> dict[str, torch.Tensor]:
    """The tensors of part `name`: its safetensors / .bin file (plain first, then the variant) or its shards."""
    part = folder / name
    for v in ([variant] if variant else [None, "fp16"]):
        for stem in ("diffusion_pytorch_model", "model", "pytorch_model"):
            for ext in (".safetensors", ".bin"):
                file = part / (stem + (f".{v}" if v else "") + ext)
                if file.is_file():
                    return read_checkpoint(file)[0]
                shards = file.with_name(file.name + ".index.json")
                if shards.is_file():
                    weight_map = _read_json(shards, folder).get("weight_map")
                    if not isinstance(weight_map, dict):
                        raise InputError(f"{folder}: {name}/{shards.name} has no weight_map; download it again")
                    tensors = {}
                    for shard in sorted(set(weight_map.values())):
                        tensors.update(read_checkpoint(part / shard)[0])
                    return tensors
    wanted = f".{variant}" if variant else ""
    raise InputError(f"{folder}: {name}/ has no weights file (diffusion_pytorch_model{wanted}.safetensors, "
                     f"model{wanted}.safetensors or .bin); the download is incomplete: fetch {name}/ again")


def translate_parts(parts: dict, scheduler: dict, folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """`read_diffusers_folder` once the files are read: `parts` maps "unet", "vae", "text_encoder(_2)" to (their
    config.json, their state dict), `scheduler` is scheduler_config.json ({} for none); `folder` names the source."""
    unet_cfg, unet = parts["unet"]
    vae_cfg, vae = parts["vae"]
    unet_params = _unet_params(unet_cfg, folder)
    up_attention = [t.startswith("CrossAttn") for t in unet_cfg.get("up_block_types", UNET_CONFIG["up_block_types"])]
    tensors = unet_to_original(unet, layers_per_block=unet_params["num_res_blocks"], up_attention=up_attention)
    embed_dim, ddconfig, scale_factor = _vae_params(vae_cfg, folder)
    tensors.update(vae_to_original(vae, levels=len(ddconfig["ch_mult"])))
    schedule = _schedule(scheduler, folder)
    extra = {k: schedule.pop(k) for k in ("timestep_spacing", "zero_terminal_snr") if k in schedule}
    if unet_cfg.get("addition_embed_type") == "text_time":  # SDXL: sgm's layout
        embedders = _sdxl_embedders(parts, unet_cfg, tensors, folder)
        network = {"adm_in_channels": unet_cfg["projection_class_embeddings_input_dim"], "num_classes": "sequential",
                   **{k: v for k, v in unet_params.items() if k != "legacy"},
                   "spatial_transformer_attn_type": "softmax", "legacy": False}
        return tensors, {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
            "scale_factor": scale_factor, "disable_first_stage_autocast": True,
            "denoiser_config": _sgm_denoiser(schedule, folder),
            "network_config": {"target": UNET_TARGET, "params": network},
            "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": embedders}},
            "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": {
                "embed_dim": embed_dim, "monitor": "val/rec_loss", "ddconfig": {"attn_type": "vanilla", **ddconfig},
                "lossconfig": {"target": "torch.nn.Identity"}}},
            **extra}}}
    cond_stage, sd2 = _sd_text_encoder(parts, tensors, folder)
    config = copy.deepcopy(SD_V2 if (sd2 if sd2 is not None else unet_params["use_linear_in_transformer"]) else SD_V1)
    params = config["model"]["params"]
    params.update(schedule, scale_factor=scale_factor, channels=embed_dim, **extra)
    if isinstance(unet_cfg.get("sample_size"), int):
        params["image_size"] = unet_cfg["sample_size"]
    params["unet_config"]["params"] = unet_params
    params["first_stage_config"]["params"].update(embed_dim=embed_dim, ddconfig=ddconfig)
    if cond_stage is None:
        params.pop("cond_stage_config")
    else:
        params["cond_stage_config"] = cond_stage
    return tensors, config


def _unsupported(folder: Path, part: str, key: str, value: Any, expected: Any) -> InputError:
    return InputError(f"{folder}: {part}/config.json has {key}={value!r}, which Stable Diffusion 1.x/2.x/XL models "
                      f"do not use (expected {expected!r}); this kind of model is not supported")


def _uniform(value: Any, folder: Path, part: str, key: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise _unsupported(folder, part, key, value, "one value for every level")
        value = value[0]
    return value


def _unet_params(cfg: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    """The original `unet_config.params` of a diffusers UNet2DConditionModel config."""
    for key in UNET_FIXED:
        if cfg.get(key, UNET_CONFIG[key]) != UNET_CONFIG[key]:
            raise _unsupported(folder, "unet", key, cfg[key], UNET_CONFIG[key])
    if cfg.get("addition_embed_type") not in (None, "text_time"):
        raise _unsupported(folder, "unet", "addition_embed_type", cfg["addition_embed_type"], "text_time or null")
    if cfg.get("resnet_time_scale_shift", "default") not in ("default", "scale_shift"):
        raise _unsupported(folder, "unet", "resnet_time_scale_shift", cfg["resnet_time_scale_shift"], "default")
    get = lambda key: cfg.get(key, UNET_CONFIG[key])  # noqa: E731
    widths, down, up = list(get("block_out_channels")), list(get("down_block_types")), list(get("up_block_types"))
    attention = [t == "CrossAttn" + DOWN for t in down]
    known = {DOWN, "CrossAttn" + DOWN, UP, "CrossAttn" + UP}
    if (len(down) != len(widths) or len(up) != len(widths) or not set(down + up) <= known
            or [t == "CrossAttn" + UP for t in reversed(up)] != attention):
        raise _unsupported(folder, "unet", "down_block_types/up_block_types", [down, up],
                           "(CrossAttn)DownBlock2D levels mirrored by (CrossAttn)UpBlock2D")
    model_channels = widths[0]
    if any(w % model_channels for w in widths):
        raise _unsupported(folder, "unet", "block_out_channels", widths, "multiples of the first width")
    used = [i for i, a in enumerate(attention) if a] + [len(widths) - 1]  # levels with attention, and the middle
    heads = cfg.get("num_attention_heads") or get("attention_head_dim")
    if isinstance(heads, int):
        head_params = {"num_heads": heads}
    else:
        dims = {widths[i] // heads[i] for i in used}
        if len(dims) == 1 and all(widths[i] % heads[i] == 0 for i in used):
            head_params = {"num_head_channels": dims.pop()}
        elif len({heads[i] for i in used}) == 1:
            head_params = {"num_heads": heads[used[0]]}
        else:
            raise _unsupported(folder, "unet", "attention_head_dim", heads,
                               "the same heads or head width at every level")
    depth = get("transformer_layers_per_block")
    if isinstance(depth, (list, tuple)):
        if any(not isinstance(d, int) for d in depth):
            raise _unsupported(folder, "unet", "transformer_layers_per_block", depth, "one number per level")
        depth = depth[0] if len(set(depth)) == 1 else list(depth)
    params = {"use_checkpoint": False, "in_channels": get("in_channels"), "out_channels": get("out_channels"),
              "model_channels": model_channels,
              "attention_resolutions": [2 ** i for i in reversed(range(len(attention))) if attention[i]],
              "num_res_blocks": _uniform(get("layers_per_block"), folder, "unet", "layers_per_block"),
              "channel_mult": [w // model_channels for w in widths], **head_params, "use_spatial_transformer": True,
              "use_linear_in_transformer": bool(get("use_linear_projection")), "transformer_depth": depth,
              "context_dim": _uniform(get("cross_attention_dim"), folder, "unet", "cross_attention_dim")}
    if cfg.get("resnet_time_scale_shift") == "scale_shift":
        params["use_scale_shift_norm"] = True
    if cfg.get("num_class_embeds"):
        params["num_classes"] = cfg["num_class_embeds"]
    return {**params, "legacy": False}


def _vae_params(cfg: Mapping[str, Any], folder: Path) -> tuple[int, dict[str, Any], float]:
    """(embed_dim, ddconfig, scale_factor) of a diffusers AutoencoderKL config."""
    for key in VAE_FIXED:
        if cfg.get(key, VAE_CONFIG[key]) != VAE_CONFIG[key]:
            raise _unsupported(folder, "vae", key, cfg[key], VAE_CONFIG[key])
    get = lambda key: cfg.get(key, VAE_CONFIG[key])  # noqa: E731
    widths = list(get("block_out_channels"))
    if (set(get("down_block_types")) != {"DownEncoderBlock2D"} or set(get("up_block_types")) != {"UpDecoderBlock2D"}
            or len(get("down_block_types")) != len(widths) or len(get("up_block_types")) != len(widths)):
        raise _unsupported(folder, "vae", "down_block_types/up_block_types",
                           [get("down_block_types"), get("up_block_types")],
                           "DownEncoderBlock2D / UpDecoderBlock2D per level")
    ch = widths[0]
    ddconfig = {"double_z": True, "z_channels": get("latent_channels"), "resolution": get("sample_size"),
                "in_channels": get("in_channels"), "out_ch": get("out_channels"), "ch": ch,
                "ch_mult": [w // ch for w in widths],
                "num_res_blocks": _uniform(get("layers_per_block"), folder, "vae", "layers_per_block"),
                "attn_resolutions": [], "dropout": 0.0}
    return get("latent_channels"), ddconfig, float(get("scaling_factor"))


def _schedule(cfg: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    """The original config's schedule keys (+ timestep_spacing, zero_terminal_snr) of a scheduler config."""
    prediction = cfg.get("prediction_type", "epsilon")
    betas = cfg.get("beta_schedule", "scaled_linear")
    if prediction not in PREDICTION:
        raise InputError(f"{folder}: scheduler prediction_type {prediction!r} is not one of {', '.join(PREDICTION)}")
    if betas not in BETAS or cfg.get("trained_betas") is not None:
        raise InputError(f"{folder}: scheduler beta_schedule {betas!r} (or trained_betas) is not supported; "
                         f"supported: {', '.join(BETAS)}")
    schedule = {"parameterization": PREDICTION[prediction], "timesteps": int(cfg.get("num_train_timesteps", 1000)),
                "beta_schedule": BETAS[betas], "linear_start": float(cfg.get("beta_start", 0.00085)),
                "linear_end": float(cfg.get("beta_end", 0.012))}
    if cfg.get("timestep_spacing") is not None:
        schedule["timestep_spacing"] = cfg["timestep_spacing"]
    if cfg.get("rescale_betas_zero_snr"):
        schedule["zero_terminal_snr"] = True
    return schedule


def _sgm_denoiser(schedule: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    if schedule["parameterization"] not in ("eps", "v") or schedule["beta_schedule"] != "linear":
        raise InputError(f"{folder}: an SDXL scheduler must be epsilon or v_prediction on the scaled_linear schedule, "
                         f"got {schedule['parameterization']} on {schedule['beta_schedule']}")
    kind = "Eps" if schedule["parameterization"] == "eps" else "V"
    discretization = {"linear_start": schedule["linear_start"], "linear_end": schedule["linear_end"],
                      "num_timesteps": schedule["timesteps"]}
    defaults = {"linear_start": 0.00085, "linear_end": 0.012, "num_timesteps": 1000}
    discretization = {k: v for k, v in discretization.items() if v != defaults[k]}
    return {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", "params": {
        "num_idx": schedule["timesteps"],
        "weighting_config": {"target": f"sgm.modules.diffusionmodules.denoiser_weighting.{kind}Weighting"},
        "scaling_config": {"target": f"sgm.modules.diffusionmodules.denoiser_scaling.{kind}Scaling"},
        "discretization_config": {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization",
                                  **({"params": discretization} if discretization else {})}}}


def _hf_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The `HFCLIPConfig` fields of a transformers CLIPTextConfig (config.json)."""
    return {name: cfg.get(name, default) for name, default in VIT_L.items()}


def _open_clip_sizes(cfg: Mapping[str, Any], folder: Path, part: str, *, extra_layers: int = 0) -> dict[str, Any]:
    """open_clip `text_cfg` of a transformers CLIPTextConfig (an OpenCLIP tower in Hugging Face layout)."""
    hf = _hf_config(cfg)
    if hf["hidden_act"] != "gelu" or hf["layer_norm_eps"] != 1e-5:
        raise _unsupported(folder, part, "hidden_act/layer_norm_eps", [hf["hidden_act"], hf["layer_norm_eps"]],
                           ["gelu", 1e-5])
    text_cfg = {"context_length": hf["max_position_embeddings"], "vocab_size": hf["vocab_size"],
                "width": hf["hidden_size"], "heads": hf["num_attention_heads"],
                "layers": hf["num_hidden_layers"] + extra_layers}
    if hf["intermediate_size"] != 4 * hf["hidden_size"]:
        text_cfg["mlp_ratio"] = hf["intermediate_size"] / hf["hidden_size"]
    return text_cfg


def _arch(text_cfg: Mapping[str, Any], embed_dim: int) -> str | None:
    return next((arch for arch, sizes in OPEN_CLIP_TOWERS.items() if sizes == (dict(text_cfg), embed_dim)), None)


def _sd_text_encoder(parts: dict, tensors: dict, folder: Path) -> tuple[dict | None, bool | None]:
    """(cond_stage_config, whether it is SD 2.x's) of an SD 1.x / 2.x folder; its tensors go into `tensors`."""
    if "text_encoder" not in parts:
        return None, None
    cfg, weights = parts["text_encoder"]
    hf = _hf_config(cfg)
    if hf["hidden_act"] == "quick_gelu":  # OpenAI's CLIP: SD 1.x, Hugging Face layout
        tensors.update(hf_clip_to_original(weights, "cond_stage_model.transformer."))
        return ({"target": HF_CLIP_TARGET} if hf == VIT_L else
                {"target": HF_CLIP_TARGET, "params": {"hf_config": hf}}), False
    text_cfg = _open_clip_sizes(cfg, folder, "text_encoder", extra_layers=1)  # + the zero block (module docstring)
    vit_h, vit_h_dim = OPEN_CLIP_TOWERS["ViT-H-14"]
    embed_dim = vit_h_dim if text_cfg == vit_h else int(cfg.get("projection_dim", hf["hidden_size"]))
    tensors.update(hf_clip_to_open_clip_tower(weights, "cond_stage_model.", embed_dim=embed_dim, pad_blocks=1))
    params = {"freeze": True, "layer": "penultimate"}
    if text_cfg != vit_h:
        params.update(text_cfg=text_cfg, embed_dim=embed_dim)
    return {"target": OPEN_CLIP_TARGET, "params": params}, True


def _sdxl_embedders(parts: dict, unet_cfg: Mapping[str, Any], tensors: dict, folder: Path) -> list[dict[str, Any]]:
    """sgm's `emb_models` of an SDXL folder (base: CLIP-L, bigG, 3 sizes; refiner: bigG, 2 sizes, aesthetic
    score); the text towers' tensors go into `tensors`."""
    if "text_encoder_2" not in parts:
        raise InputError(f"{folder}: an SDXL folder needs text_encoder_2/ (OpenCLIP bigG, which gives the pooled text "
                         "embedding); copy the complete model folder")
    embedders = []
    if "text_encoder" in parts:  # base: CLIP ViT-L, penultimate layer (hidden_states[N - 1]), no final norm
        cfg, weights = parts["text_encoder"]
        hf = _hf_config(cfg)
        tensors.update(hf_clip_to_original(weights, "conditioner.embedders.0.transformer."))
        embedders.append({"is_trainable": False, "input_key": "txt", "target": CLIP_EMBEDDER, "params": {
            "layer": "hidden", "layer_idx": hf["num_hidden_layers"] - 1, "hf_config": hf}})
    cfg, weights = parts["text_encoder_2"]
    text_cfg = _open_clip_sizes(cfg, folder, "text_encoder_2")
    embed_dim = int(cfg.get("projection_dim", text_cfg["width"]))
    tensors.update(hf_clip_to_open_clip_tower(weights, f"conditioner.embedders.{len(embedders)}.", embed_dim=embed_dim))
    embedders.append({"is_trainable": False, "input_key": "txt", "target": OPEN_CLIP_EMBEDDER, "params": {
        "arch": _arch(text_cfg, embed_dim), "version": None, "freeze": True, "layer": "penultimate",
        "always_return_pooled": True, "legacy": False, "text_cfg": text_cfg, "embed_dim": embed_dim}})
    outdim, adm = unet_cfg.get("addition_time_embed_dim"), unet_cfg.get("projection_class_embeddings_input_dim")
    numbers, rest = divmod((adm or 0) - embed_dim, outdim or 1)
    if not outdim or rest or numbers not in SDXL_SIZE_INPUTS:
        raise InputError(f"{folder}: unet/config.json projection_class_embeddings_input_dim={adm} is not the pooled "
                         f"width {embed_dim} + addition_time_embed_dim {outdim} x 6 (SDXL base) or x 5 (refiner)")
    embedders += [{"is_trainable": False, "input_key": key, "target": SIZE_EMBEDDER, "params": {"outdim": outdim}}
                  for key in SDXL_SIZE_INPUTS[numbers]]
    return embedders
