"""A training batch -> the denoiser's `model_fn(x_t, t)`: conditioned on the captions, and for an SDXL-style
conditioner also on each sample's sizes (Podell et al. 2023, sec. 2.2, "micro-conditioning").

For a text encoder the context is the captions' encoding (run inside the trained module when the encoder
trains, without gradients when it is frozen, or read from the batch's cached contexts). For a `Conditioner`
(always frozen here) the conditioning is {"context", "y"}: the towers' outputs for the captions, and y = the
pooled text embedding followed by the Fourier features of the batch's original_size (h, w), crop (top, left)
and target_size (h, w) (and aesthetic_score where the conditioner takes one: the sample's, else sgm's 6.0).
A dropped caption ("") gives zeros for its text outputs (context and pooled) where `config.zero_uncond` is set,
as sgm's base trains its unconditional side and samples it (the size features stay); otherwise "" encoded.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from common.errors import InputError
from ldm.conditioner import AESTHETIC_SCORE, Conditioner
from ldm.model import LatentDiffusion

# sgm's size inputs <- the batch's fields (ldm.data.buckets.collate_sizes)
BATCH_FIELDS = {"original_size_as_tuple": "original_size", "crop_coords_top_left": "crop",
                "target_size_as_tuple": "target_size", "aesthetic_score": "aesthetic_score"}
REENCODE_SIZES = ("these latent shards record no sizes (micro.json), which an SDXL-style model conditions on: "
                  "re-encode them with tools/encode_latents.py and this model's config")


def is_conditioner(module: nn.Module | None) -> bool:
    return isinstance(module, Conditioner)


def batch_sizes(conditioner: Conditioner, batch: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """The conditioner's size inputs (sgm's names, float32 [B, n]) from a batch's micro-conditioning fields."""
    if "original_size" not in batch:
        raise InputError(REENCODE_SIZES)
    sizes = {}
    for name in conditioner.config.size_inputs:
        values = batch[BATCH_FIELDS[name]]
        if name == "aesthetic_score":
            values = [[AESTHETIC_SCORE if score is None else score] for score in values]
        sizes[name] = torch.as_tensor(values, dtype=torch.float32, device=device).reshape(len(batch["caption"]), -1)
    return sizes


@torch.no_grad()
def text_outputs(conditioner: Conditioner, captions: Sequence[str], device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [B, tokens, width], pooled [B, dim]) of `captions`, encoded (what encode_latents.py caches)."""
    return _encoded(conditioner, captions, device)


def _encoded(conditioner: Conditioner, captions: Sequence[str], device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
    return conditioner.text_outputs([tower.tokenize(list(captions)).to(device) for tower in conditioner.towers])


def unconditional_text(conditioner: Conditioner) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, pooled) of a dropped caption, one sample's, on the CPU: zeros where `zero_uncond`, else ""."""
    context, pooled = text_outputs(conditioner, [""], conditioner.device)
    if conditioner.config.zero_uncond:
        context, pooled = torch.zeros_like(context), torch.zeros_like(pooled)
    return context[0].cpu(), pooled[0].cpu()


def micro_conditioning(conditioner: Conditioner, batch: Mapping[str, Any], device: torch.device
                       ) -> dict[str, torch.Tensor]:
    """{"context", "y"} of a batch: its cached text outputs ("context", "pooled"; dropped rows already filled by
    `collate_latents`) or its captions encoded now (with gradients where enabled: a conditioner trained with
    LoRA adapters), and the Fourier features of its sizes."""
    sizes = batch_sizes(conditioner, batch, device)
    if batch.get("context") is not None:
        if batch.get("pooled") is None:
            raise InputError("these latent shards hold contexts but no pooled text embedding (pooled.npy), which "
                             "an SDXL-style model needs: re-encode them with tools/encode_latents.py and this "
                             "model's config")
        context, pooled = batch["context"].to(device).float(), batch["pooled"].to(device).float()
    else:
        context, pooled = _encoded(conditioner, batch["caption"], device)
        if conditioner.config.zero_uncond:  # sgm: a dropped text embedding is multiplied by 0
            keep = torch.tensor([caption != "" for caption in batch["caption"]], device=device)
            context, pooled = context * keep[:, None, None], pooled * keep[:, None]
    features = conditioner.size_features(sizes, len(batch["caption"]), device).to(pooled.dtype)
    return {"context": context, "y": torch.cat([pooled, features], 1)}


def conditioned_model_fn(net: nn.Module, model: LatentDiffusion, batch: dict, *, train_text: bool,
                         device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`model_fn(x_t, t)`: the denoiser conditioned on the batch's captions (and, for a conditioner, its sizes).

    A trained text encoder runs inside `net` (DDP sees its gradients). A frozen one runs without gradients,
    inside model_fn (so under the loss's autocast), unless the batch brings its cached contexts."""
    if is_conditioner(model.text_encoder):
        if batch.get("context") is not None:
            cond = micro_conditioning(model.text_encoder, batch, device)
            return lambda x, t: net(x, t, context=cond["context"], y=cond["y"])
        if train_text:  # inside `net`, on its own conditioner (DDP sees the text towers' gradients)
            return lambda x, t: net(x, t, condition=lambda conditioner: micro_conditioning(conditioner, batch, device))

        def frozen_conditioner_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                cond = micro_conditioning(model.text_encoder, batch, device)
            return net(x, t, context=cond["context"], y=cond["y"])

        return frozen_conditioner_fn
    if batch.get("context") is not None and not train_text:
        context = batch["context"].to(device).float()
        return lambda x, t: net(x, t, context=context)
    tokens = model.text_encoder.tokenize(batch["caption"]).to(device)
    if train_text:
        return lambda x, t: net(x, t, tokens)

    def frozen_text_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            context = model.text_encoder(tokens)
        return net(x, t, context=context)

    return frozen_text_fn
