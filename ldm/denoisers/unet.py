"""The cross-attention UNet denoiser of LDM / Stable Diffusion (Rombach et al. 2022, sec. 3.3) and SDXL.

The module tree is that of the original `ldm.modules.diffusionmodules.openaimodel.UNetModel` with
`use_spatial_transformer=True` (the ADM UNet of Dhariwal & Nichol 2021 with a transformer at the
attention resolutions), so the `model.diffusion_model.*` keys of SD 1.x/2.x checkpoints load with
no renaming: same names, shapes and `state_dict` order. SDXL's UNet (Podell et al. 2023, sec. 2.1;
sgm's `openaimodel.UNetModel`) is the same tree with a transformer depth per level and the
"sequential" vector conditioning `label_emb(y)` added to the timestep embedding.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from autoencoder.modules import is_channels_last
from common.config import check_keys, check_length, check_range, coerce_numbers, whole_numbers
from common.errors import InputError
from ldm.denoisers.attention import SpatialTransformer
from ldm.denoisers.conv import Conv2d
from ldm.denoisers.embeddings import timestep_embedding

# Original unet_config params that change no weight (read and dropped), those we accept only at
# the value every SD 1.x/2.x UNet uses (other values change the module tree), and the original
# defaults of the rest (`openaimodel.UNetModel.__init__`).
IGNORED_ORIGINAL = ("image_size", "use_fp16", "use_bf16", "num_heads_upsample", "use_new_attention_order",
                    "spatial_transformer_attn_type")  # sgm's attention kernel choice: ours is global
FIXED_ORIGINAL = {"use_spatial_transformer": True, "n_embed": None, "disable_self_attentions": None,
                  "num_attention_blocks": None, "disable_middle_self_attn": False, "disable_middle_transformer": False}
# Upper bounds far above every released model (SDXL: 320 channels, depth 10, context 2048, vector 2816), so
# that a hostile config is refused before anything is allocated.
BOUNDS = {"in_channels": (1, 1024), "out_channels": (1, 1024), "model_channels": (1, 8192), "num_res_blocks": (1, 32),
          "channel_mult": (1, 64), "attention_resolutions": (1, 2 ** 16), "transformer_depth": (0, 64),
          "transformer_depth_middle": (0, 64), "context_dim": (1, 16384), "adm_in_channels": (1, 16384),
          "num_heads": (-1, 1024), "num_head_channels": (-1, 8192)}
REQUIRED_ORIGINAL = ("in_channels", "out_channels", "model_channels", "num_res_blocks", "attention_resolutions",
                     "context_dim")
DEFAULTS_ORIGINAL = {"channel_mult": (1, 2, 4, 8), "num_heads": -1, "num_head_channels": -1, "legacy": True}


@dataclass
class UNetConfig:
    """Architecture of a `UNetModel`; field names are the original unet_config params (SD 1.x defaults).

    Heads: `num_heads` fixed per block (SD 1.x: 8) or `num_head_channels` per head (SD 2.x: 64);
    -1 marks the unused one. `transformer_depth` is one depth or one per level (SDXL: [1, 2, 10]; a
    level without attention ignores its entry); the middle block's is `transformer_depth_middle`
    (default: the last level's). `num_classes` adds `label_emb`: a class-label embedding (a count), or
    with "sequential" an MLP of the vector `y` [B, adm_in_channels] (SDXL's pooled text + size features).
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_heads: int = 8
    num_head_channels: int = -1
    transformer_depth: int | tuple[int, ...] = 1
    transformer_depth_middle: int | None = None
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    legacy: bool = False
    num_classes: int | str | None = None
    adm_in_channels: int | None = None
    use_checkpoint: bool = False
    dropout: float = 0.0
    conv_resample: bool = True
    dims: int = 2

    def __post_init__(self) -> None:
        for name in ("num_res_blocks", "context_dim", "transformer_depth_middle", "adm_in_channels"):
            if isinstance(getattr(self, name), (list, tuple, dict)):
                raise InputError(f"unet config: {name} must be one number, got {getattr(self, name)!r} "
                                 "(per-level lists are not supported)")
        coerce_numbers(self, "unet")
        self.channel_mult = whole_numbers(self.channel_mult, "unet config", "channel_mult")
        self.attention_resolutions = whole_numbers(self.attention_resolutions, "unet config", "attention_resolutions")
        check_length(self.channel_mult, "unet config", "channel_mult", 1, 8)
        if isinstance(self.transformer_depth, (list, tuple)):
            self.transformer_depth = whole_numbers(self.transformer_depth, "unet config", "transformer_depth")
            if len(self.transformer_depth) != len(self.channel_mult):
                raise InputError(f"unet config: transformer_depth has {len(self.transformer_depth)} entries but "
                                 f"there are {len(self.channel_mult)} levels (channel_mult); give one per level")
        else:
            self.transformer_depth = whole_numbers([self.transformer_depth], "unet config", "transformer_depth")[0]
        for name in ("transformer_depth_middle", "adm_in_channels"):
            if getattr(self, name) is not None:
                setattr(self, name, whole_numbers([getattr(self, name)], "unet config", name)[0])
        check_range(self, "unet config", BOUNDS)
        widest = self.model_channels * max(self.channel_mult)
        if widest > 8192:  # a 3x3 conv of that width is already a 2.4 GB weight
            raise InputError(f"unet config: model_channels x channel_mult reaches {widest} channels; at most 8192")
        if self.dims != 2:
            raise InputError(f"unet config: only dims=2 is supported, got {self.dims}")
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "context_dim"):
            if getattr(self, name) < 1:
                raise InputError(f"unet config: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise InputError("unet config: set num_heads (SD 1.x: 8) or num_head_channels (SD 2.x: 64)")
        for name in ("num_heads", "num_head_channels"):
            if getattr(self, name) != -1 and getattr(self, name) < 1:
                raise InputError(f"unet config: {name} must be >= 1, or -1 for unused, got {getattr(self, name)}")
        self._check_label_embedding()
        widths = [self.model_channels * m for m in self.channel_mult]
        if any(w % 32 for w in widths):
            raise InputError(f"unet config: model_channels x channel_mult = {widths} must all be divisible "
                             "by 32 (GroupNorm uses 32 groups)")
        depths = self.depths
        attention_levels = [level for level in range(len(widths)) if 2 ** level in self.attention_resolutions]
        for level in attention_levels:
            if depths[level] < 1:
                raise InputError(f"unet config: level {level} has attention (resolution {2 ** level}) but "
                                 "transformer_depth 0 there; give it a depth >= 1")
        with_attention = {widths[level] for level in attention_levels}
        for w in sorted(with_attention | {widths[-1]}):  # the middle block always has a transformer
            heads, dim_head = attention_heads(self, w)
            if heads < 1 or heads * dim_head != w:
                raise InputError(f"unet config: {w} channels do not split into whole heads "
                                 f"(num_heads={self.num_heads}, num_head_channels={self.num_head_channels})")

    def _check_label_embedding(self) -> None:
        if self.num_classes == "sequential":
            if self.adm_in_channels is None:
                raise InputError("unet config: num_classes 'sequential' needs adm_in_channels (the width of the "
                                 "vector y, SDXL base: 2816)")
        elif self.num_classes is not None and (isinstance(self.num_classes, bool)
                                               or not isinstance(self.num_classes, int)
                                               or not 1 <= self.num_classes <= 100_000):
            raise InputError(f"unet config: num_classes must be a count from 1 to 100000, 'sequential' or null, "
                             f"got {self.num_classes!r}")
        elif self.adm_in_channels is not None:
            raise InputError("unet config: adm_in_channels is only used with num_classes: sequential")

    @property
    def depths(self) -> tuple[int, ...]:
        """The transformer depth of each level, then the middle block's."""
        per_level = (self.transformer_depth if isinstance(self.transformer_depth, tuple)
                     else (self.transformer_depth,) * len(self.channel_mult))
        middle = per_level[-1] if self.transformer_depth_middle is None else self.transformer_depth_middle
        return (*per_level, middle)

    @property
    def vector_dim(self) -> int | None:
        """The width of the vector conditioning `y` (SDXL), or None."""
        return self.adm_in_channels if self.num_classes == "sequential" else None

    @property
    def latent_multiple(self) -> int:
        """Latent sides must be multiples of this: each level but the last halves the map, and the way up
        must meet the skip connections at the same size."""
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_resolutions"] = list(self.attention_resolutions)
        if isinstance(self.transformer_depth, tuple):
            d["transformer_depth"] = list(self.transformer_depth)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
        """Build from our own dict (the output of `to_dict`); unknown keys are an InputError."""
        check_keys(cls, d, "unet")
        return cls(**d)

    @classmethod
    def from_original(cls, params: dict[str, Any]) -> "UNetConfig":
        """Build from an original `unet_config.params` dict (e.g. of v1-inference.yaml)."""
        params = dict(params)
        params.setdefault("use_spatial_transformer", False)
        for key, value in FIXED_ORIGINAL.items():
            if key in params and params.pop(key) != value:
                raise InputError(f"original unet config: only {key}: {value!r} is supported (the cross-attention "
                                 "UNet of Stable Diffusion)")
        params = {k: v for k, v in params.items() if k not in IGNORED_ORIGINAL}
        context = params.get("context_dim")
        if isinstance(context, (list, tuple)):  # sgm: one context width per level (the refiner's [1280] * 4)
            if len(set(context)) != 1:
                raise InputError(f"original unet config: context_dim {list(context)} differs between levels; only "
                                 "one context width is supported")
            params["context_dim"] = context[0]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise InputError(f"original unet config: unknown keys {unknown}; known are "
                             f"{sorted(known | set(IGNORED_ORIGINAL) | set(FIXED_ORIGINAL))}")
        missing = [k for k in REQUIRED_ORIGINAL if params.get(k) is None]
        if missing:
            raise InputError(f"original unet config: {missing} must be given")
        return cls(**{**DEFAULTS_ORIGINAL, **params})


def attention_heads(config: UNetConfig, channels: int) -> tuple[int, int]:
    """(heads, dim_head) of the transformer at `channels` width, computed as the original does."""
    if config.num_head_channels == -1:
        heads, dim_head = config.num_heads, channels // config.num_heads
    else:
        heads, dim_head = channels // config.num_head_channels, config.num_head_channels
    if config.legacy:  # the original's legacy branch, for the spatial transformer
        dim_head = channels // heads if heads > 0 else 0
    return heads, dim_head


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32, eps 1e-5) computed in float32 and cast back, as the original `normalization`."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with padding 1 (`op`), or 2x2 average pooling without `use_conv`."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest 2x upsampling, then a 3x3 conv (`conv`) with `use_conv`."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ResBlock(nn.Module):
    """Residual block with the timestep embedding added (or as scale/shift) between its two convs."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int, *,
                 use_scale_shift_norm: bool = False, use_checkpoint: bool = False, up: bool = False,
                 down: bool = False):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else Conv2d(channels, out_channels, 1)
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:  # resample between the activation and the conv, as the original
            h = self.h_upd(self.in_layers[:-1](x))
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to ResBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """The LDM denoiser: forward(x [B,C,H,W], timesteps [B], context [B,T,context_dim]) -> [B,C_out,H,W].

    H and W must be divisible by 2 ** (len(channel_mult) - 1). The output is whatever the model was
    trained to predict (eps or v); the noise process lives elsewhere.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        emb_dim = cfg.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(cfg.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.num_classes == "sequential":  # sgm: Sequential(Sequential(linear, SiLU, linear)), keys label_emb.0.*
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(),
                                                         nn.Linear(emb_dim, emb_dim)))
        elif cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)

        def res_block(ch_in: int, ch_out: int, **updown: bool) -> ResBlock:
            return ResBlock(ch_in, emb_dim, cfg.dropout, ch_out, use_scale_shift_norm=cfg.use_scale_shift_norm,
                            use_checkpoint=cfg.use_checkpoint, **updown)

        depths = cfg.depths

        def transformer(ch: int, level: int) -> SpatialTransformer:
            heads, dim_head = attention_heads(cfg, ch)
            return SpatialTransformer(ch, heads, dim_head, depth=depths[level], context_dim=cfg.context_dim,
                                      use_linear=cfg.use_linear_in_transformer, use_checkpoint=cfg.use_checkpoint)

        ch = cfg.model_channels
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        ds = 1  # downsampling factor of the current level; attention where it is in attention_resolutions
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mult * cfg.model_channels)]
                ch = mult * cfg.model_channels
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = res_block(ch, ch, down=True) if cfg.resblock_updown else Downsample(ch, cfg.conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res_block(ch, ch), transformer(ch, -1), res_block(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), cfg.model_channels * mult)]
                ch = cfg.model_channels * mult
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch, level))
                if level and i == cfg.num_res_blocks:
                    layers.append(res_block(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch, cfg.conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict from noisy latents `x` at `timesteps`; `y` are class labels [B] or, for "sequential" models
        (SDXL), the vector [B, adm_in_channels] (num_classes models only).

        Inputs are cast to the weights' dtype; the output has the dtype of `x`.
        """
        if context is None:
            raise InputError(f"UNet: context is required ([B, T, {self.config.context_dim}] text embeddings)")
        if (y is not None) != (self.config.num_classes is not None):
            raise InputError("UNet: pass class labels y exactly when the model has num_classes "
                             f"(num_classes={self.config.num_classes})")
        factor = 2 ** (len(self.config.channel_mult) - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise InputError(f"UNet: latent height and width must be divisible by {factor}, got {list(x.shape[-2:])}")
        dtype = self.time_embed[0].weight.dtype
        timesteps = timesteps.expand(x.shape[0])  # a scalar timestep applies to the whole batch
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(dtype) if y.is_floating_point() else y)
        h, context = x.to(dtype), context.to(dtype)
        channels_last = is_channels_last(self.input_blocks[0][0].weight)
        if channels_last:  # model.to(memory_format=torch.channels_last): feed the convs their layout
            h = h.contiguous(memory_format=torch.channels_last)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        out = self.out(h).to(x.dtype)
        return out.contiguous() if channels_last else out


