"""Writing diffusers-format folders (`ldm.formats.diffusers.write_diffusers_folder`): original-named tensors and
an original-style config (LDM or sgm layout) -> `model_index.json` and one folder per part, as diffusers'
`save_pretrained` writes them, so that diffusers' and transformers' `from_pretrained` load each part.

Schedulers: DDIMScheduler for SD 1.x / 2.x (as SD 2.x's published folders), EulerDiscreteScheduler for SDXL, with
the config's `timestep_spacing` when it has one, else "leading" with `steps_offset` 1, the published folders'
setting (sgm's own sampler spacing is "trailing"). Text towers: SD 2.x's OpenCLIP tower is written without its
last block when the config reads the penultimate layer (diffusers' convention), and without text_projection /
logit_scale; SDXL's towers keep every block (diffusers' SDXL pipelines read hidden_states[-2]).
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from common.checkpoint import DiskFullError, is_disk_full
from common.errors import InputError
from ldm.formats.diffusers_keys import (
    BETAS,
    DIFFUSERS_VERSION,
    DOWN,
    OPEN_CLIP_TOWERS,
    PREDICTION,
    UNET_CONFIG,
    UP,
    VAE_CONFIG,
    VIT_L,
    hf_clip_from_original,
    open_clip_tower_to_hf_clip,
    unet_from_original,
    vae_from_original,
)
from ldm.formats.sgm import CLIP_EMBEDDER, OPEN_CLIP_EMBEDDER, SIZE_EMBEDDER
from ldm.text import HF_CLIP_TARGET, OPEN_CLIP_TARGET
from ldm.text.bpe import bytes_to_unicode, default_bpe

CLIP_VOCAB_SIZE = 49408  # towers with this vocabulary get a tokenizer folder (CLIP's BPE)


def write_diffusers_folder(tensors: Mapping[str, torch.Tensor], original_config: Mapping[str, Any],
                           folder: str | Path) -> None:
    """Write original-named `tensors` with their original-style config (LDM or sgm layout, as
    `read_diffusers_folder` returns) as a diffusers folder that diffusers' `from_pretrained` loads: model_index.json,
    each part's config.json and weights (`diffusion_pytorch_model.safetensors` / `model.safetensors`, in the
    tensors' dtype), scheduler/, and tokenizers where the vocabulary is CLIP's (module docstring). Atomic: written
    into a temporary folder beside `folder`, then renamed; on any failure (a full disk included) nothing is left.
    `folder` must not exist yet (or be empty)."""
    folder = Path(folder)
    check_new_folder(folder)
    files = diffusers_files(tensors, original_config)
    needed = sum(sum(t.nbytes for t in v.values()) if isinstance(v, dict) else len(v) for v in files.values())
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; the folder gets the mode a plain mkdir would
        for name, content in files.items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, dict):
                weights = {k: v.detach().contiguous().cpu() for k, v in content.items()}
                save_file(weights, str(path), metadata={"format": "pt"})  # transformers reads only "pt" files
            else:
                path.write_text(content, encoding="utf-8")
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise DiskFullError(folder, needed) from None
        raise


def check_new_folder(folder: str | Path) -> None:
    """InputError unless `folder` is free for a new diffusers folder: absent, or an empty folder."""
    folder = Path(folder)
    if folder.exists() and not (folder.is_dir() and not any(folder.iterdir())):
        raise InputError(f"{folder} already exists: choose a new folder name for the diffusers model "
                         "(nothing is overwritten)")


def clip_tokenizer_files(*, pad_token: str, bpe: str | Path | None = None) -> dict[str, str]:
    """The files of a Hugging Face `CLIPTokenizer` folder (vocab.json, merges.txt, special_tokens_map.json,
    tokenizer_config.json) built from an open_clip BPE merges file (default: open_clip's CLIP BPE, 49408
    tokens), with `pad_token` ("<|endoftext|>" for SD 1.x and SDXL's CLIP-L, "!" (id 0) for OpenCLIP towers)."""
    merges = gzip.open(bpe or default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())  # as open_clip's SimpleTokenizer builds its vocabulary
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token,
               "unk_token": "<|endoftext|>"}
    config = {**special, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
              "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    return {"vocab.json": json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "".join(m + "\n" for m in merges),
            "special_tokens_map.json": _json(special), "tokenizer_config.json": _json(config)}


def _json(data: Mapping[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def diffusers_files(tensors: Mapping[str, torch.Tensor], original_config: Mapping[str, Any]) -> dict[str, Any]:
    """{path in the folder: tensors (a safetensors file) or text} of a diffusers folder (see the module docstring)."""
    model = original_config.get("model", original_config) if isinstance(original_config, Mapping) else {}
    params = (model.get("params") or {}) if isinstance(model, Mapping) else {}
    sgm = "network_config" in params
    unet = (params.get("network_config" if sgm else "unet_config") or {}).get("params")
    first_stage = (params.get("first_stage_config") or {}).get("params") or {}
    if not unet or "ddconfig" not in first_stage:
        raise InputError("a diffusers folder holds a whole text-to-image model: the config needs a UNet (unet_config "
                         "or network_config) and a first stage (first_stage_config.params.ddconfig)")
    towers, sizes = _towers(params, sgm)
    unet_weights = unet_from_original(tensors, layers_per_block=unet["num_res_blocks"])
    dtype = next((t.dtype for t in unet_weights.values() if t.is_floating_point()), torch.float32)
    sample_size = params.get("image_size") or (128 if sgm else 64)  # the latent size (SDXL: 1024 px)
    files: dict[str, Any] = {
        "unet/config.json": _json(_unet_config(unet, sizes, sample_size=sample_size)),
        "unet/diffusion_pytorch_model.safetensors": unet_weights,
        "vae/config.json": _json(_vae_config(first_stage, float(params.get("scale_factor", 1.0)))),
        "vae/diffusion_pytorch_model.safetensors": vae_from_original(tensors,
                                                                     levels=len(first_stage["ddconfig"]["ch_mult"])),
    }
    components = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    for tower in towers:
        part, tokenizer = tower["part"], tower["part"].replace("text_encoder", "tokenizer")
        if tower["open_clip"]:
            weights = open_clip_tower_to_hf_clip(tensors, tower["prefix"], drop_blocks=tower["drop"],
                                                 with_projection=tower["with_projection"])
        else:
            weights = hf_clip_from_original(tensors, tower["prefix"])
        kind = "CLIPTextModelWithProjection" if tower["with_projection"] else "CLIPTextModel"
        files[f"{part}/config.json"] = _json({
            "architectures": [kind], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
            **tower["hf"], "initializer_factor": 1.0, "initializer_range": 0.02, "model_type": "clip_text_model",
            "pad_token_id": 1, "projection_dim": tower["projection_dim"],
            "torch_dtype": str(dtype).removeprefix("torch."),
            "transformers_version": "4.44.0"})  # eos_token_id 2: pool at the argmax token (EOT), as CLIP and sgm
        files[f"{part}/model.safetensors"] = weights
        components[part] = ["transformers", kind]
        if tower["hf"]["vocab_size"] == CLIP_VOCAB_SIZE:
            tokenizer_files = clip_tokenizer_files(pad_token=tower["pad"])
            files.update({f"{tokenizer}/{name}": text for name, text in tokenizer_files.items()})
            components[tokenizer] = ["transformers", "CLIPTokenizer"]
    claimed = tuple(t["prefix"] for t in towers)
    leftover = [k for k in tensors if k.startswith(("cond_stage_model.", "conditioner.embedders."))
                and not (claimed and k.startswith(claimed))]
    if leftover:
        raise InputError(f"the text-encoder tensors {', '.join(leftover[:3])} belong to no text encoder of the config")
    schedule = _schedule(params, sgm)
    scheduler = "EulerDiscreteScheduler" if sgm else "DDIMScheduler"
    files["scheduler/scheduler_config.json"] = _json(_scheduler_config(scheduler, schedule))
    components["scheduler"] = ["diffusers", scheduler]
    files["model_index.json"] = _json(_model_index(components, sgm, inpaint=unet.get("in_channels") == 9))
    return files


def _towers(params: Mapping[str, Any], sgm: bool) -> tuple[list[dict[str, Any]], list[tuple[str, int]]]:
    """The text towers of a config (part, key prefix, sizes, ...) and, for sgm, its size embedders (input_key,
    outdim)."""
    if not sgm:
        section = params.get("cond_stage_config") or {}
        target, p = section.get("target"), section.get("params") or {}
        if not section or target == "torch.nn.Identity":
            return [], []
        if target == HF_CLIP_TARGET and p.get("layer", "last") == "last":
            return [_hf_tower(p, "text_encoder", "cond_stage_model.transformer.")], []
        if target == OPEN_CLIP_TARGET:
            drop = int(p.get("layer", "last") == "penultimate")  # diffusers keeps the blocks SD 2.x reads
            return [_open_clip_tower(p, "text_encoder", "cond_stage_model.", drop=drop, with_projection=False)], []
        raise InputError(f"cond_stage_config {target} (layer {p.get('layer')}) has no diffusers equivalent")
    towers, sizes = [], []
    for i, embedder in enumerate((params.get("conditioner_config") or {}).get("params", {}).get("emb_models") or []):
        target, p = embedder.get("target"), embedder.get("params") or {}
        if target == CLIP_EMBEDDER:
            tower = _hf_tower(p, "text_encoder", f"conditioner.embedders.{i}.transformer.")
            if p.get("layer") != "hidden" or p.get("layer_idx") != tower["hf"]["num_hidden_layers"] - 1:
                raise InputError("FrozenCLIPEmbedder: only SDXL's layer: hidden at layer_idx = layers - 1 (the "
                                 "penultimate layer) has a diffusers equivalent, got layer "
                                 f"{p.get('layer')}, layer_idx {p.get('layer_idx')}")
            towers.append(tower)
        elif target == OPEN_CLIP_EMBEDDER and p.get("layer", "last") == "penultimate":
            towers.append(_open_clip_tower(p, "text_encoder_2", f"conditioner.embedders.{i}.", drop=0,
                                           with_projection=True))
        elif target == SIZE_EMBEDDER:
            sizes.append((embedder.get("input_key"), int(p.get("outdim", 256))))
        else:
            raise InputError(f"SDXL embedder {target} (layer {p.get('layer')}) has no diffusers equivalent")
    return towers, sizes


def _hf_tower(p: Mapping[str, Any], part: str, prefix: str) -> dict[str, Any]:
    hf = {**VIT_L, **(p.get("hf_config") or {})}
    return {"part": part, "prefix": prefix, "hf": hf, "projection_dim": 768 if hf == VIT_L else hf["hidden_size"],
            "open_clip": False, "drop": 0, "with_projection": False, "pad": "<|endoftext|>"}


def _open_clip_tower(p: Mapping[str, Any], part: str, prefix: str, *, drop: int,
                     with_projection: bool) -> dict[str, Any]:
    if "text_cfg" in p:
        text_cfg, embed_dim = p["text_cfg"], p.get("embed_dim")
    elif p.get("arch", "ViT-H-14") in OPEN_CLIP_TOWERS:
        text_cfg, embed_dim = OPEN_CLIP_TOWERS[p.get("arch", "ViT-H-14")]
    else:
        import open_clip  # imported here: slow to import, and only other towers need it

        config = open_clip.get_model_config(p["arch"]) or {}
        if "text_cfg" not in config:
            raise InputError(f"unknown open_clip architecture {p['arch']!r}")
        text_cfg, embed_dim = config["text_cfg"], config["embed_dim"]
    width = text_cfg["width"]
    hf = {"vocab_size": text_cfg.get("vocab_size", CLIP_VOCAB_SIZE), "hidden_size": width,
          "intermediate_size": int(width * text_cfg.get("mlp_ratio", 4.0)),
          "num_hidden_layers": text_cfg["layers"] - drop,
          "num_attention_heads": text_cfg["heads"], "max_position_embeddings": text_cfg.get("context_length", 77),
          "hidden_act": "gelu", "layer_norm_eps": 1e-5}
    return {"part": part, "prefix": prefix, "hf": hf, "projection_dim": embed_dim or width, "open_clip": True,
            "drop": drop, "with_projection": with_projection, "pad": "!"}


def _unet_config(p: Mapping[str, Any], sizes: list[tuple[str, int]], *, sample_size: int) -> dict[str, Any]:
    if p.get("resblock_updown") or p.get("use_spatial_transformer") is False or p.get("num_attention_blocks"):
        raise InputError("this UNet (resblock_updown, no spatial transformer or num_attention_blocks) has no diffusers "
                         "UNet2DConditionModel equivalent")
    widths = [p["model_channels"] * m for m in p.get("channel_mult", (1, 2, 4, 8))]
    attention = [2 ** i in p["attention_resolutions"] for i in range(len(widths))]
    depth = p.get("transformer_depth", 1)
    if p.get("transformer_depth_middle") not in (None, depth[-1] if isinstance(depth, list) else depth):
        raise InputError("transformer_depth_middle other than the last level's depth has no diffusers equivalent")
    context = p["context_dim"][0] if isinstance(p["context_dim"], list) else p["context_dim"]
    heads = ([w // p["num_head_channels"] for w in widths] if p.get("num_head_channels", -1) != -1
             else p["num_heads"])
    config = {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION, **UNET_CONFIG,
              "attention_head_dim": heads, "block_out_channels": widths, "cross_attention_dim": context,
              "down_block_types": [("CrossAttn" if a else "") + DOWN for a in attention],
              "up_block_types": [("CrossAttn" if a else "") + UP for a in reversed(attention)],
              "in_channels": p["in_channels"], "out_channels": p["out_channels"],
              "layers_per_block": p["num_res_blocks"], "sample_size": sample_size,
              "transformer_layers_per_block": list(depth) if isinstance(depth, list) else depth,
              "use_linear_projection": bool(p.get("use_linear_in_transformer", False))}
    if p.get("use_scale_shift_norm"):
        config["resnet_time_scale_shift"] = "scale_shift"
    if p.get("num_classes") == "sequential":  # SDXL: label_emb(pooled text + size features)
        if not sizes or len({outdim for _, outdim in sizes}) != 1:
            raise InputError("an SDXL UNet (num_classes: sequential) needs the conditioner's size embedders "
                             "(of one outdim)")
        config.update(addition_embed_type="text_time", addition_time_embed_dim=sizes[0][1],
                      projection_class_embeddings_input_dim=p["adm_in_channels"])
    elif p.get("num_classes") is not None:
        config["num_class_embeds"] = int(p["num_classes"])
    return config


def _vae_config(first_stage: Mapping[str, Any], scale_factor: float) -> dict[str, Any]:
    dd = first_stage["ddconfig"]
    if dd.get("attn_resolutions"):
        raise InputError("a first stage with attention inside its levels (attn_resolutions) has no diffusers "
                         "equivalent")
    if first_stage.get("embed_dim", dd["z_channels"]) != dd["z_channels"]:
        raise InputError("a first stage whose embed_dim differs from z_channels has no diffusers equivalent")
    widths = [dd["ch"] * m for m in dd["ch_mult"]]
    return {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, **VAE_CONFIG,
            "block_out_channels": widths, "down_block_types": ["DownEncoderBlock2D"] * len(widths),
            "up_block_types": ["UpDecoderBlock2D"] * len(widths), "in_channels": dd.get("in_channels", 3),
            "out_channels": dd.get("out_ch", 3), "latent_channels": dd["z_channels"],
            "layers_per_block": dd["num_res_blocks"],
            "sample_size": dd.get("resolution", 256), "scaling_factor": scale_factor}


def _schedule(params: Mapping[str, Any], sgm: bool) -> dict[str, Any]:
    """(prediction_type, beta_schedule, ...) in diffusers' terms, from an LDM or sgm config."""
    if sgm:
        denoiser = (params.get("denoiser_config") or {}).get("params") or {}
        scaling = str((denoiser.get("scaling_config") or {}).get("target", "EpsScaling"))
        parameterization = {"EpsScaling": "eps", "VScaling": "v"}.get(scaling.rsplit(".", 1)[-1])
        if parameterization is None:
            raise InputError(f"denoiser scaling {scaling} has no diffusers scheduler equivalent (EpsScaling, VScaling)")
        discretization = (denoiser.get("discretization_config") or {}).get("params") or {}
        original = {"parameterization": parameterization, "beta_schedule": "linear",
                    "timesteps": denoiser.get("num_idx", discretization.get("num_timesteps", 1000)),
                    "linear_start": discretization.get("linear_start", 0.00085),
                    "linear_end": discretization.get("linear_end", 0.012)}
    else:
        original = {"parameterization": params.get("parameterization", "eps"),
                    "beta_schedule": params.get("beta_schedule", "linear"), "timesteps": params.get("timesteps", 1000),
                    "linear_start": params.get("linear_start", 0.00085), "linear_end": params.get("linear_end", 0.012)}
    prediction = {v: k for k, v in PREDICTION.items()}.get(original["parameterization"])
    betas = {v: k for k, v in BETAS.items()}.get(original["beta_schedule"])
    if prediction is None or betas is None:
        raise InputError(f"parameterization {original['parameterization']!r} / beta_schedule "
                         f"{original['beta_schedule']!r} has no diffusers scheduler equivalent")
    return {"prediction_type": prediction, "beta_schedule": betas, "num_train_timesteps": int(original["timesteps"]),
            "beta_start": float(original["linear_start"]), "beta_end": float(original["linear_end"]),
            "timestep_spacing": params.get("timestep_spacing") or "leading",
            "rescale_betas_zero_snr": bool(params.get("zero_terminal_snr", False))}


def _scheduler_config(name: str, schedule: Mapping[str, Any]) -> dict[str, Any]:
    common = {"_class_name": name, "_diffusers_version": DIFFUSERS_VERSION, **schedule, "clip_sample": False,
              "sample_max_value": 1.0, "set_alpha_to_one": False, "steps_offset": 1, "trained_betas": None}
    if name == "EulerDiscreteScheduler":
        return {**common, "interpolation_type": "linear", "skip_prk_steps": True, "use_karras_sigmas": False}
    return {**common, "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995, "thresholding": False}


def _model_index(components: Mapping[str, list], sgm: bool, *, inpaint: bool) -> dict[str, Any]:
    absent = [None, None]
    parts = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2") if sgm else ("text_encoder", "tokenizer")
    index = {"_diffusers_version": DIFFUSERS_VERSION, "feature_extractor": absent, "image_encoder": absent,
             **{part: components.get(part, absent) for part in parts}, **components}
    if not sgm:
        pipeline = "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline"
        return {"_class_name": pipeline, **index, "requires_safety_checker": False, "safety_checker": absent}
    base = "text_encoder" in components  # the refiner has only the bigG tower, and aesthetic-score conditioning
    pipeline = ("StableDiffusionXLInpaintPipeline" if inpaint else
                "StableDiffusionXLPipeline" if base else "StableDiffusionXLImg2ImgPipeline")
    return {"_class_name": pipeline, **index, "force_zeros_for_empty_prompt": base,
            **({} if base else {"requires_aesthetics_score": True})}
