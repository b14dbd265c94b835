"""SDXL's conditioner: prompts and image sizes -> {"context", "y"} (Podell et al. 2023, sec. 2.1-2.2).

It is sgm's `GeneralConditioner` with SDXL's embedders, in config order (their indices are the keys
`conditioner.embedders.N.*`):
- the text towers (base: CLIP ViT-L in Hugging Face layout, then OpenCLIP ViT-bigG; refiner: bigG
  alone), each at its penultimate layer with no final norm; their token features are joined on the
  width axis into the cross-attention `context` [B, 77, sum of widths];
- one Fourier embedder per size input (sgm's `ConcatTimestepEmbedderND`): each number x becomes
  [cos(x f), sin(x f)], f_i = 10000**(-i / (size_dim / 2)), the timestep embedding of DDPM/ADM.
`y` [B, adm_in_channels] is the pooled text embedding of the `pooled` tower (`ln_final(last)[EOT] @
text_projection`), then the size features in embedder order. The UNet adds `label_emb(y)` to its
timestep embedding. For the unconditional side of guidance, sgm's base zeros the text outputs
(context and pooled; the size features stay) instead of encoding "" (`zero_uncond`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from common.config import check_keys, check_range, coerce_numbers
from common.errors import InputError
from ldm.denoisers.embeddings import timestep_embedding
from ldm.text import TextEncoderConfig, build_text_encoder
from ldm.text.prompts import chunk_towers, emphasize

# sgm's input keys of the size embedders, and how many numbers each takes.
SIZE_INPUTS = {"original_size_as_tuple": 2, "crop_coords_top_left": 2, "target_size_as_tuple": 2, "aesthetic_score": 1}
# sgm's defaults for the refiner's aesthetic score (sgm/inference/api.py): positive, negative side.
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5


@dataclass
class ConditionerConfig:
    """The embedders of an SDXL-style conditioner: `text` towers (in order), the index of the one whose
    pooled embedding starts `y`, the size inputs (sgm's keys, in order) and their Fourier width."""

    text: list = field(default_factory=list)  # TextEncoderConfig, one per tower
    pooled: int = -1
    size_inputs: tuple[str, ...] = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
    size_dim: int = 256
    zero_uncond: bool = True   # base: zeros for an empty negative prompt; the refiner encodes it (sgm's is_legacy)
    kind: str = "conditioner"

    def __post_init__(self) -> None:
        coerce_numbers(self, "conditioner")
        if self.kind != "conditioner":
            raise InputError(f"conditioner config: kind must be 'conditioner', got {self.kind!r}")
        if not isinstance(self.text, (list, tuple)) or not 1 <= len(self.text) <= 8:
            raise InputError("conditioner config: text must list 1 to 8 text encoders")
        self.text = [t if isinstance(t, TextEncoderConfig) else TextEncoderConfig.from_dict(t) for t in self.text]
        check_range(self, "conditioner", {"pooled": (-len(self.text), len(self.text) - 1), "size_dim": (2, 8192)})
        if self.size_dim % 2:
            raise InputError(f"conditioner config: size_dim must be even (cos and sin halves), got {self.size_dim}")
        self.size_inputs = tuple(self.size_inputs)
        unknown = [name for name in self.size_inputs if name not in SIZE_INPUTS]
        if unknown:
            raise InputError(f"conditioner config: unknown size inputs {unknown}; known are {list(SIZE_INPUTS)}")
        if not self.text[self.pooled].with_projection:
            raise InputError("conditioner config: the pooled text tower needs its text_projection (with_projection)")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["size_inputs"] = list(self.size_inputs)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ConditionerConfig":
        check_keys(cls, dict(d), "conditioner")
        return cls(**d)


class FourierEmbedder(nn.Module):
    """sgm's `ConcatTimestepEmbedderND`: values [B, n] -> [B, n * dim], each number embedded on its own."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(values.reshape(-1), self.dim).reshape(values.shape[0], -1)


class Conditioner(nn.Module):
    """`embedders`: the text towers, then one `FourierEmbedder` per size input (see the module docstring)."""

    def __init__(self, config: ConditionerConfig):
        super().__init__()
        self.config = config
        towers = [build_text_encoder(t) for t in config.text]
        self.embedders = nn.ModuleList([*towers, *(FourierEmbedder(config.size_dim) for _ in config.size_inputs)])
        self.text_towers = len(towers)

    @property
    def towers(self) -> list[nn.Module]:
        return list(self.embedders[:self.text_towers])

    @property
    def device(self) -> torch.device:
        return self.towers[0].device

    @property
    def pooled_dim(self) -> int:
        """The width of the pooled text embedding that starts `y`."""
        return self.towers[self.config.pooled].model.text_projection.shape[1]

    @property
    def vector_dim(self) -> int:
        """The width of `y`: the pooled embedding, then `size_dim` per number of each size input."""
        return self.pooled_dim + sum(SIZE_INPUTS[name] * self.config.size_dim for name in self.config.size_inputs)

    @property
    def width(self) -> int:
        """The width of the context: the towers' widths together."""
        return sum(tower.width for tower in self.towers)

    def text_outputs(self, tokens: Sequence[torch.Tensor], *, zero_text: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, pooled) from each tower's token ids: the contexts joined on the width axis, and the pooled
        embedding of the `pooled` tower; zeros with `zero_text` (sgm's unconditional text of SDXL base)."""
        pooled_index = self.config.pooled % self.text_towers
        contexts, pooled = [], None
        for i, (tower, ids) in enumerate(zip(self.towers, tokens)):
            context, pooled_i = tower.encode_tokens(ids, pooled=i == pooled_index)
            contexts.append(context)
            pooled = pooled_i if pooled_i is not None else pooled
        context = torch.cat(contexts, dim=-1)
        if zero_text:
            context, pooled = torch.zeros_like(context), torch.zeros_like(pooled)
        return context, pooled

    def size_features(self, sizes: Mapping[str, torch.Tensor], batch: int, device: torch.device) -> torch.Tensor:
        """The size part of `y` [batch, sum of n * size_dim]: each size input's numbers [batch, n] (sgm's names)
        through its Fourier embedder, in embedder order."""
        features = []
        for name, embedder in zip(self.config.size_inputs, self.embedders[self.text_towers:]):
            if name not in sizes:
                raise InputError(f"the conditioner needs the size input {name!r}; give it (sgm's name) or use "
                                 "`condition`, which fills in SDXL's defaults")
            features.append(embedder(torch.as_tensor(sizes[name], device=device).reshape(batch, -1)))
        return torch.cat(features, dim=1)

    def forward(self, tokens: Sequence[torch.Tensor], sizes: Mapping[str, torch.Tensor], *,
                zero_text: bool = False) -> dict[str, torch.Tensor]:
        """{"context", "y"} from each tower's token ids and each size input's numbers [B, n]."""
        context, pooled = self.text_outputs(tokens, zero_text=zero_text)
        features = self.size_features(sizes, context.shape[0], context.device).to(pooled.dtype)
        return {"context": context, "y": torch.cat([pooled, features], dim=1)}

    def condition(self, prompts: str | Sequence[str], *, image_size: tuple[int, int], unconditional: bool = False,
                  original_size: tuple[int, int] | None = None, crop: tuple[int, int] = (0, 0),
                  target_size: tuple[int, int] | None = None,
                  aesthetic_score: float | None = None) -> dict[str, torch.Tensor]:
        """The conditioning of `prompts` (A1111's syntax, any length: the context has 77 tokens per chunk) for
        images of `image_size` (height, width), with SDXL pipelines' micro-conditioning defaults: original and
        target size = the image size, crop (0, 0), aesthetic score 6.0 (2.5 on the unconditional side). With
        `unconditional` and empty prompts, a base model's text part is zeros (sgm); a non-empty negative prompt
        is encoded."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if aesthetic_score is None:
            aesthetic_score = NEGATIVE_AESTHETIC_SCORE if unconditional else AESTHETIC_SCORE
        values = {"original_size_as_tuple": original_size or image_size, "crop_coords_top_left": crop,
                  "target_size_as_tuple": target_size or image_size, "aesthetic_score": (aesthetic_score,)}
        sizes = {name: torch.tensor([list(values[name])] * len(prompts), dtype=torch.float32)
                 for name in self.config.size_inputs}
        zero = unconditional and self.config.zero_uncond and not any(p.strip() for p in prompts)
        # Prompts in A1111's syntax, of any length (ldm/text/prompts.py): each chunk of 77 tokens through every
        # tower, weighted tower by tower, the chunks joined on the token axis; y from the first chunk.
        chunks = chunk_towers(self.towers, prompts)
        widths = [tower.width for tower in self.towers]
        contexts, y = [], None
        for i in range(chunks[0].count):
            out = self([c.tokens[:, i].to(self.device) for c in chunks], sizes, zero_text=zero)
            contexts.append(emphasize(out["context"], [c.weights[:, i] for c in chunks], widths=widths))
            y = out["y"] if y is None else y
        return {"context": contexts[0] if len(contexts) == 1 else torch.cat(contexts, dim=1), "y": y}


def build_conditioning(config: TextEncoderConfig | ConditionerConfig) -> nn.Module:
    """The module that turns prompts into the denoiser's conditioning: a text encoder, or a conditioner."""
    if isinstance(config, ConditionerConfig):
        return Conditioner(config)
    return build_text_encoder(config)
