"""The diffusers format's names: tensors of diffusers folders <-> the original single-file names (SD 1.x / 2.x /
XL), and the fields of its config files.

A diffusers folder keeps each part's state dict in its own folder; the original files hold one state
dict with a prefix per part. Each map here renames one part, both ways, and is pure (no files):

- `unet/` (`UNet2DConditionModel`) <-> `model.diffusion_model.*` (openaimodel `UNetModel`):
  `down_blocks.b.resnets.j` / `.attentions.j` are `input_blocks.(1 + b(L+1) + j).0` / `.1`, with
  L = layers_per_block; `down_blocks.b.downsamplers.0.conv` is `input_blocks.((b+1)(L+1)).0.op`;
  `mid_block.resnets.0 / attentions.0 / resnets.1` are `middle_block.0 / 1 / 2`; `up_blocks.b.*.j`
  are `output_blocks.(b(L+1) + j)`, whose upsampler `conv` sits at index 2 after an attention, else
  at 1; `time_embedding.linear_1/2` -> `time_embed.0/2`, SDXL's `add_embedding.linear_1/2` ->
  `label_emb.0.0/0.2`, `conv_norm_out` -> `out.0`, `conv_out` -> `out.2`. Inside a resnet: norm1,
  conv1, norm2, conv2, time_emb_proj, conv_shortcut are in_layers.0, in_layers.2, out_layers.0,
  out_layers.3, emb_layers.1, skip_connection. Transformer blocks have the same names in both
  (proj_in / proj_out are Linear for SD 2.x / XL and 1x1 convs for SD 1.x in both).
- `vae/` (`AutoencoderKL`) <-> `first_stage_model.*`: `down_blocks.i.resnets.j` -> `down.i.block.j`,
  `up_blocks.i` -> `up.(levels - 1 - i)` (the original numbers the decoder's levels from the bottom),
  `mid_block.resnets.j` -> `mid.block_(j+1)`, `conv_norm_out` -> `norm_out`, `conv_shortcut` ->
  `nin_shortcut`; the mid attention's Linear `to_q/to_k/to_v/to_out.0` [C, C] (older folders:
  `query/key/value/proj_attn`) are the 1x1 convs `q/k/v/proj_out` [C, C, 1, 1], `group_norm` -> `norm`.
- text towers: see `hf_clip_to_original`, `hf_clip_to_open_clip_tower` and their inverses.

The end of the module holds the diffusers configs' field names and defaults, which reading checks and writing fills.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping, Sequence

import torch

from common.errors import InputError
from ldm.text.hf_clip import HFCLIPConfig
from ldm.text.keymaps import hf_clip_to_open_clip, open_clip_to_hf_clip

Tensors = dict[str, torch.Tensor]

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_NAMES = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
               "add_embedding.linear_2": "label_emb.0.2", "class_embedding": "label_emb",
               "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_SAME = r"(quant_conv|post_quant_conv|(encoder|decoder)\.(conv_in|conv_out))\.(weight|bias)"  # in both layouts
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                  "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # the last four: diffusers < 0.14


def _swap(rest: str, table: Mapping[str, str]) -> str | None:
    """`rest` with its leading module name renamed by `table` (None if it has none of the table's names)."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return None


def _unexpected(part: str, key: str) -> InputError:
    return InputError(f"{part}: unexpected tensor {key!r} (not a Stable Diffusion 1.x/2.x/XL layout); "
                      "is the folder from another kind of model?")


# --- UNet -------------------------------------------------------------------------------------------

def unet_to_original(tensors: Mapping[str, torch.Tensor], *, layers_per_block: int,
                     up_attention: Sequence[bool]) -> Tensors:
    """diffusers `unet/` names -> `model.diffusion_model.*`; `up_attention[b]`: up block b has attentions."""
    return {"model.diffusion_model." + _unet_original_name(key, layers_per_block, up_attention): value
            for key, value in tensors.items()}


def _unet_original_name(key: str, L: int, up_attention: Sequence[bool]) -> str:
    for old, new in _UNET_NAMES.items():
        if key.startswith(old + ".") and key.count(".") == old.count(".") + 1:
            return new + key[len(old):]
    name = None
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if j < L:
            name = (f"input_blocks.{1 + b * (L + 1) + j}." + ("0." + (_swap(rest, _RESNET) or "?")
                                                                  if kind == "resnets" else "1." + rest))
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
        name = f"input_blocks.{(int(m[1]) + 1) * (L + 1)}.0.op.{m[2]}"
    elif m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", key):
        name = f"middle_block.{2 * int(m[1])}." + (_swap(m[2], _RESNET) or "?")
    elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        name = f"middle_block.1.{m[1]}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if j <= L:
            name = (f"output_blocks.{b * (L + 1) + j}." + ("0." + (_swap(rest, _RESNET) or "?")
                                                           if kind == "resnets" else "1." + rest))
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
        b = int(m[1])
        if b < len(up_attention):
            name = f"output_blocks.{b * (L + 1) + L}.{2 if up_attention[b] else 1}.conv.{m[2]}"
    if name is None or "?" in name:
        raise _unexpected("unet", key)
    return name


def unet_from_original(tensors: Mapping[str, torch.Tensor], *, layers_per_block: int) -> Tensors:
    """`model.diffusion_model.*` -> diffusers `unet/` names (the inverse of `unet_to_original`)."""
    prefix = "model.diffusion_model."
    return {_unet_diffusers_name(key[len(prefix):], layers_per_block): value
            for key, value in tensors.items() if key.startswith(prefix)}


def _unet_diffusers_name(key: str, L: int) -> str:
    inverse = {new: old for old, new in _UNET_NAMES.items()}
    for old, new in inverse.items():
        if key.startswith(old + ".") and key.count(".") == old.count(".") + 1:
            return new + key[len(old):]
    resnet = {new: old for old, new in _RESNET.items()}
    name = None
    if m := re.fullmatch(r"input_blocks\.(\d+)\.([01])\.(.+)", key):
        i, k, rest = int(m[1]), int(m[2]), m[3]
        b, j = divmod(i - 1, L + 1)
        if i > 0 and j == L and k == 0 and rest.startswith("op."):
            name = f"down_blocks.{b}.downsamplers.0.conv.{rest[3:]}"
        elif i > 0 and j < L:
            name = f"down_blocks.{b}." + (f"resnets.{j}." + (_swap(rest, resnet) or "?") if k == 0
                                          else f"attentions.{j}.{rest}")
    elif m := re.fullmatch(r"middle_block\.([012])\.(.+)", key):
        k, rest = int(m[1]), m[2]
        name = (f"mid_block.attentions.0.{rest}" if k == 1
                else f"mid_block.resnets.{k // 2}." + (_swap(rest, resnet) or "?"))
    elif m := re.fullmatch(r"output_blocks\.(\d+)\.([012])\.(.+)", key):
        (b, j), k, rest = divmod(int(m[1]), L + 1), int(m[2]), m[3]
        if k > 0 and rest.startswith("conv."):
            name = f"up_blocks.{b}.upsamplers.0.{rest}"
        elif k == 0:
            name = f"up_blocks.{b}.resnets.{j}." + (_swap(rest, resnet) or "?")
        elif k == 1:
            name = f"up_blocks.{b}.attentions.{j}.{rest}"
    if name is None or "?" in name:
        raise InputError(f"model.diffusion_model.{key} has no diffusers name: the UNet is not an SD 1.x/2.x/XL "
                         "layout (resblock_updown and other variants are not supported)")
    return name


# --- VAE --------------------------------------------------------------------------------------------

def vae_to_original(tensors: Mapping[str, torch.Tensor], *, levels: int) -> Tensors:
    """diffusers `vae/` names -> `first_stage_model.*` (mid attention Linear weights become 1x1 convs)."""
    out = {}
    for key, value in tensors.items():
        name = _vae_original_name(key, levels)
        if name is None:
            raise _unexpected("vae", key)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # Linear [C, C] -> conv [C, C, 1, 1] (a view)
        out["first_stage_model." + name] = value
    return out


def _vae_original_name(key: str, levels: int) -> str | None:
    if re.fullmatch(_VAE_SAME, key):
        return key
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(weight|bias)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}" if int(m[1]) < levels else None
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}" if int(m[1]) < levels else None
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet(m[3])}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        rest = _swap(m[2], _VAE_ATTENTION)
        return f"{m[1]}.mid.attn_1.{rest}" if rest else None
    return None


def _vae_resnet(rest: str) -> str:
    return "nin_shortcut" + rest[len("conv_shortcut"):] if rest.startswith("conv_shortcut.") else rest


def vae_from_original(tensors: Mapping[str, torch.Tensor], *, levels: int) -> Tensors:
    """`first_stage_model.*` -> diffusers `vae/` names, as diffusers >= 0.14 names them (the inverse of
    `vae_to_original`); the mid attention's 1x1 conv weights become Linear weights."""
    prefix, out = "first_stage_model.", {}
    attention = {new: old for old, new in list(_VAE_ATTENTION.items())[:5]}
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name.startswith("loss."):  # training-time state of the original first stage
            continue
        if m := re.fullmatch(r"(encoder|decoder)\.norm_out\.(.+)", name):
            name = f"{m[1]}.conv_norm_out.{m[2]}"
        elif m := re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)", name):
            name = f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{m[3].replace('nin_shortcut', 'conv_shortcut')}"
        elif m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(.+)", name):
            name = f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)", name):
            rest = m[3].replace("nin_shortcut", "conv_shortcut")
            name = f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}.{rest}"
        elif m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(.+)", name):
            name = f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.+)", name):
            name = f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{m[3].replace('nin_shortcut', 'conv_shortcut')}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(.+)", name):
            name = f"{m[1]}.mid_block.attentions.0.{_swap(m[2], attention) or '?'}"
            if name.endswith(".weight") and value.ndim == 4:
                value = value[:, :, 0, 0]  # 1x1 conv [C, C, 1, 1] -> Linear [C, C]
        elif not re.fullmatch(_VAE_SAME, name):
            name = "?"
        if "?" in name:
            raise InputError(f"{key} has no diffusers name: the first stage is not an SD-style KL autoencoder "
                             "(attention inside the levels is not supported by diffusers' AutoencoderKL)")
        out[name] = value
    return out


# --- text towers ------------------------------------------------------------------------------------

def hf_clip_to_original(tensors: Mapping[str, torch.Tensor], prefix: str) -> Tensors:
    """A `CLIPTextModel` state dict (`text_model.*`, or transformers 5's names without it) -> `prefix +
    "text_model.*"` (SD 1.x: `cond_stage_model.transformer.`, SDXL: `conditioner.embedders.0.transformer.`),
    with `embeddings.position_ids` = arange(positions) (int64 [1, n]) added where the folder has none."""
    out = {prefix + "text_model." + key.removeprefix("text_model."): value for key, value in tensors.items()}
    position_ids = prefix + "text_model.embeddings.position_ids"
    if position_ids not in out:
        positions = out.get(prefix + "text_model.embeddings.position_embedding.weight")
        if positions is None:
            raise InputError("text encoder: no text_model.embeddings.position_embedding.weight; "
                             "is it a CLIP text model?")
        out[position_ids] = torch.arange(positions.shape[0])[None]
    return out


def hf_clip_from_original(tensors: Mapping[str, torch.Tensor], prefix: str) -> Tensors:
    """`prefix + "text_model.*"` -> `text_model.*` as transformers saves a `CLIPTextModel` (no position_ids)."""
    return {key[len(prefix):]: value for key, value in tensors.items()
            if key.startswith(prefix) and not key.endswith("embeddings.position_ids")}


LOGIT_SCALE = math.log(100)  # CLIP's trained logit scale (clamped at ln 100); unused for conditioning


def hf_clip_to_open_clip_tower(tensors: Mapping[str, torch.Tensor], prefix: str, *, embed_dim: int,
                               pad_blocks: int = 0) -> Tensors:
    """A `CLIPTextModel(WithProjection)` state dict -> the open_clip layout `prefix + "model.*"` (SD 2.x:
    `cond_stage_model.`, SDXL's bigG: `conditioner.embedders.N.`), as the original files hold it.

    `text_projection.weight` [embed, width] becomes `model.text_projection` [width, embed]; without one (SD 2.x's
    `CLIPTextModel`) it is zeros. `model.logit_scale` (never in a diffusers folder) is ln 100. `pad_blocks`
    appends all-zero residual blocks: a pre-LN block whose weights are all zero adds zero to its input, so it is
    the identity and every layer choice computes what the folder's tower computes (SD 2.x: diffusers keeps 23 of
    ViT-H's 24 blocks; `penultimate` of the padded 24 is the output of block 23, then `ln_final`, as before).
    """
    hf = dict(tensors)
    projection = hf.pop("text_projection.weight", None)
    tower = hf_clip_to_open_clip(hf)  # model.* in open_clip's order: positional, blocks, token embedding, ln_final
    blocks = sorted({int(m[1]) for k in tower if (m := re.match(r"model\.transformer\.resblocks\.(\d+)\.", k))})
    last = f"model.transformer.resblocks.{blocks[-1]}."
    for n in range(pad_blocks):
        tower.update({f"model.transformer.resblocks.{len(blocks) + n}.{k[len(last):]}": torch.zeros_like(v)
                      for k, v in list(tower.items()) if k.startswith(last)})
    positional = tower["model.positional_embedding"]
    if projection is None:
        projection = torch.zeros(embed_dim, positional.shape[1], dtype=positional.dtype)
    out = {prefix + "model.positional_embedding": positional,
           prefix + "model.text_projection": projection.T.contiguous(),
           prefix + "model.logit_scale": torch.tensor(LOGIT_SCALE, dtype=positional.dtype)}
    out.update({prefix + k: v for k, v in tower.items()})  # the original order (the manifests' order)
    return out


def open_clip_tower_to_hf_clip(tensors: Mapping[str, torch.Tensor], prefix: str, *, drop_blocks: int = 0,
                               with_projection: bool) -> Tensors:
    """The inverse of `hf_clip_to_open_clip_tower`: `prefix + "model.*"` -> `text_model.*` (+ `text_projection.weight`
    with `with_projection`), leaving out the last `drop_blocks` blocks and `logit_scale`."""
    tower = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    projection = tower.pop("model.text_projection", None)
    tower.pop("model.logit_scale", None)
    blocks = sorted({int(m[1]) for k in tower if (m := re.match(r"model\.transformer\.resblocks\.(\d+)\.", k))})
    dropped = tuple(f"model.transformer.resblocks.{b}." for b in blocks[len(blocks) - drop_blocks:])
    tower = {k: v for k, v in tower.items() if not (dropped and k.startswith(dropped))}
    out = hf_clip_from_original(open_clip_to_hf_clip(tower), "transformer.")
    if with_projection:
        if projection is None:
            raise InputError(f"{prefix}model.text_projection is missing: the pooled text tower needs it")
        out["text_projection.weight"] = projection.T.contiguous()
    return out


# --- config fields and values of the diffusers format --------------------------------------------

VIT_L = {f.name: f.default for f in dataclasses.fields(HFCLIPConfig)}  # OpenAI CLIP ViT-L/14's text tower
OPEN_CLIP_TOWERS = {  # (text_cfg, embed_dim) of the OpenCLIP towers of SD 2.x and SDXL
    "ViT-H-14": ({"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}, 1024),
    "ViT-bigG-14": ({"context_length": 77, "vocab_size": 49408, "width": 1280, "heads": 20, "layers": 32}, 1280)}
SDXL_SIZE_INPUTS = {6: ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"),  # base: 2+2+2
                    5: ("original_size_as_tuple", "crop_coords_top_left", "aesthetic_score")}  # refiner: 2+2+1
PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
BETAS = {"scaled_linear": "linear", "linear": "sqrt_linear", "squaredcos_cap_v2": "cosine"}  # diffusers -> original
DIFFUSERS_VERSION = "0.30.0"
DOWN, UP = "DownBlock2D", "UpBlock2D"
# diffusers' UNet2DConditionModel / AutoencoderKL config fields with their defaults, as `save_pretrained` writes
# them; those in *_FIXED change the computation, and every SD 1.x/2.x/XL model has the default there.
UNET_CONFIG = {"act_fn": "silu", "addition_embed_type": None, "addition_embed_type_num_heads": 64,
               "addition_time_embed_dim": None, "attention_head_dim": 8, "attention_type": "default",
               "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "class_embed_type": None,
               "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 1280,
               "cross_attention_norm": None, "down_block_types": ["CrossAttn" + DOWN] * 3 + [DOWN],
               "downsample_padding": 1, "dropout": 0.0, "dual_cross_attention": False, "encoder_hid_dim": None,
               "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
               "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
               "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
               "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
               "projection_class_embeddings_input_dim": None, "resnet_out_scale_factor": 1.0,
               "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
               "reverse_transformer_layers_per_block": None, "sample_size": 64, "time_cond_proj_dim": None,
               "time_embedding_act_fn": None, "time_embedding_dim": None, "time_embedding_type": "positional",
               "timestep_post_act": None, "transformer_layers_per_block": 1,
               "up_block_types": [UP] + ["CrossAttn" + UP] * 3, "upcast_attention": False,
               "use_linear_projection": False}
UNET_FIXED = ("act_fn", "attention_type", "center_input_sample", "class_embed_type", "class_embeddings_concat",
              "conv_in_kernel", "conv_out_kernel", "cross_attention_norm", "downsample_padding", "dual_cross_attention",
              "encoder_hid_dim", "encoder_hid_dim_type", "flip_sin_to_cos", "freq_shift",
              "mid_block_only_cross_attention", "mid_block_scale_factor", "mid_block_type", "norm_eps",
              "norm_num_groups", "only_cross_attention",
              "resnet_out_scale_factor", "resnet_skip_time_act", "reverse_transformer_layers_per_block",
              "time_cond_proj_dim", "time_embedding_act_fn", "time_embedding_dim", "time_embedding_type",
              "timestep_post_act")
VAE_CONFIG = {"act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
              "down_block_types": ["DownEncoderBlock2D"] * 4,
              "force_upcast": True, "in_channels": 3, "latent_channels": 4, "latents_mean": None, "latents_std": None,
              "layers_per_block": 2, "mid_block_add_attention": True, "norm_num_groups": 32, "out_channels": 3,
              "sample_size": 512, "scaling_factor": 0.18215, "shift_factor": None,
              "up_block_types": ["UpDecoderBlock2D"] * 4, "use_post_quant_conv": True, "use_quant_conv": True}
VAE_FIXED = ("act_fn", "latents_mean", "latents_std", "mid_block_add_attention", "norm_num_groups", "shift_factor",
             "use_post_quant_conv", "use_quant_conv")
