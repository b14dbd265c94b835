"""Checkpoint key maps for text towers: open_clip files, and SD 1.x's Hugging Face CLIP layout."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import torch

from common.checkpoint import load_state_dict_checked, read_checkpoint
from common.errors import InputError
from ldm.text.encoders import OpenCLIPTextEncoder

_UNUSED_OPEN_CLIP_KEYS = ("text_projection", "logit_scale", "logit_bias")  # not used for conditioning


def load_open_clip_weights(module: OpenCLIPTextEncoder, path: str | Path) -> None:
    """Load the text tower of a local open_clip checkpoint (`open_clip_pytorch_model.bin`, .safetensors).

    `visual.*` is skipped; `text_projection`/`logit_scale` are skipped where the module has none.
    """
    tensors, _ = read_checkpoint(path)
    if tensors and all(k.startswith("module.") for k in tensors):  # saved from DistributedDataParallel
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    expected = module.state_dict()
    state = {}
    for key, value in tensors.items():
        if key.startswith("visual.") or key in ("input_resolution", "context_length", "vocab_size"):
            continue
        name = "model." + key.removeprefix("text.")  # CustomTextCLIP keeps its text tower under "text."
        if name in expected or key not in _UNUSED_OPEN_CLIP_KEYS:
            state[name] = value
    load_state_dict_checked(module, state, source=f"open_clip checkpoint {path}")


# SD 1.x (Hugging Face CLIPTextModel) <-> open_clip names, per block, in each layout's state-dict order.
_HF_ATTN = ("q_proj", "k_proj", "v_proj")


_BLOCK_NAMES = {"layer_norm1": "ln_1", "self_attn.out_proj": "attn.out_proj", "layer_norm2": "ln_2",
                "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


_HF_BLOCK_ORDER = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
                   "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2")


def _take(state: dict[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if key not in state:
        raise InputError(f"{what} state dict has no {key!r}; is it a CLIP text encoder?")
    return state.pop(key)


def _num_layers(keys: Sequence[str], pattern: str) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def hf_clip_to_open_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 1.x's HF `CLIPTextModel` weights (`transformer.text_model.*`, `text_model.*` or, as in
    transformers 5, `embeddings.*`) -> our names (`model.*`, no text_projection / logit_scale).

    q, k, v projections are concatenated into `in_proj_weight` / `in_proj_bias`; position_ids is dropped.
    """
    hf = {re.sub(r"^(transformer\.)?(text_model\.)?", "", k): v for k, v in state_dict.items()}
    hf.pop("embeddings.position_ids", None)
    what = "SD 1.x text encoder"
    out = {"model.positional_embedding": _take(hf, "embeddings.position_embedding.weight", what)}
    for i in range(_num_layers(list(hf), r"encoder\.layers\.(\d+)\.")):
        src, dst = f"encoder.layers.{i}.", f"model.transformer.resblocks.{i}."
        qkv = {p: [_take(hf, f"{src}self_attn.{n}.{p}", what) for n in _HF_ATTN] for p in ("weight", "bias")}
        for hf_name, name in _BLOCK_NAMES.items():
            if name == "attn.out_proj":  # open_clip's MultiheadAttention: in_proj before out_proj
                out[dst + "attn.in_proj_weight"] = torch.cat(qkv["weight"])
                out[dst + "attn.in_proj_bias"] = torch.cat(qkv["bias"])
            for p in ("weight", "bias"):
                out[f"{dst}{name}.{p}"] = _take(hf, f"{src}{hf_name}.{p}", what)
    out["model.token_embedding.weight"] = _take(hf, "embeddings.token_embedding.weight", what)
    for p in ("weight", "bias"):
        out[f"model.ln_final.{p}"] = _take(hf, f"final_layer_norm.{p}", what)
    if hf:
        raise InputError(f"{what}: unexpected keys {sorted(hf)[:5]}")
    return out


def open_clip_to_hf_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The exact inverse of `hf_clip_to_open_clip`: our names -> `transformer.text_model.*` as in SD 1.x
    checkpoints (transformers 4.19 order), with `position_ids` = arange(context_length)[None] (int64)."""
    ours = {k.removeprefix("model."): v for k, v in state_dict.items()}
    what = "open_clip text encoder"
    if any(k in ours for k in _UNUSED_OPEN_CLIP_KEYS):
        raise InputError("SD 1.x (HF CLIPTextModel) has no text_projection / logit_scale; "
                         "use a text encoder built with with_projection=False")
    positional = _take(ours, "positional_embedding", what)
    out = {"embeddings.position_ids": torch.arange(positional.shape[0], device=positional.device)[None],
           "embeddings.token_embedding.weight": _take(ours, "token_embedding.weight", what),
           "embeddings.position_embedding.weight": positional}
    for i in range(_num_layers(list(ours), r"transformer\.resblocks\.(\d+)\.")):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        block = {f"self_attn.{n}.{p}": t for p in ("weight", "bias")
                 for n, t in zip(_HF_ATTN, _take(ours, f"{src}attn.in_proj_{p}", what).chunk(3))}  # views of one tensor
        block = {k: t.clone() for k, t in block.items()}  # safetensors refuses tensors sharing memory
        for hf_name, name in _BLOCK_NAMES.items():
            for p in ("weight", "bias"):
                block[f"{hf_name}.{p}"] = _take(ours, f"{src}{name}.{p}", what)
        out.update({f"{dst}{name}.{p}": block[f"{name}.{p}"] for name in _HF_BLOCK_ORDER for p in ("weight", "bias")})
    for p in ("weight", "bias"):
        out[f"final_layer_norm.{p}"] = _take(ours, f"ln_final.{p}", what)
    if ours:
        raise InputError(f"{what}: unexpected keys {sorted(ours)[:5]}")
    return {"transformer.text_model." + k: v for k, v in out.items()}
