"""DiT, the latent diffusion transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

Patchify -> tokens + fixed 2-D sin-cos positions -> DiT blocks with adaLN-Zero conditioning on the
timestep embedding (sec. 3.2) -> final adaLN layer -> unpatchify. For text, each block also
cross-attends to the context tokens after its self-attention, as PixArt-alpha (Chen et al. 2023,
sec. 2.3), with its own pre-LayerNorm. The interface is the UNet's:
`forward(x [B, C, H, W], timesteps [B], context [B, T, context_dim]) -> [B, C_out, H, W]`.
Attention uses `ldm.denoisers.attention` (SDPA / xformers / math backends).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from common.config import check_range, coerce_numbers, require_mapping
from common.errors import InputError
from ldm.denoisers.attention import CrossAttention
from ldm.denoisers.embeddings import timestep_embedding

FREQUENCY_DIM = 256  # width of the sinusoidal timestep features fed to the MLP, as DiT's TimestepEmbedder

# DiT Table 1: (layers, hidden size, heads) per model size; the suffix is the patch size.
_PAPER_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
DIT_SIZES: dict[str, dict[str, int]] = {
    f"DiT-{name}/{patch}": dict(depth=depth, hidden_size=width, num_heads=heads, patch_size=patch)
    for name, (depth, width, heads) in _PAPER_SIZES.items() for patch in (2, 4, 8)}
DIT_SIZES["DiT-tiny/2"] = dict(depth=2, hidden_size=64, num_heads=4, patch_size=2)  # for CPU tests

# Far above every real transformer denoiser (DiT-XL: width 1152, depth 28; SD3 / Flux: widths to 3072, up to 57
# blocks, 16 latent channels in 2x2 patches, context width 4096) and far below sizes that could not be built: a
# hostile or broken config inside a checkpoint is refused before anything is allocated. With the two products
# below, the largest single weight (the MLP's, or the patch embedding's) stays under about 2 GB.
BOUNDS = {"input_size": (1, 4096), "patch_size": (1, 16), "in_channels": (1, 1024), "out_channels": (1, 1024),
          "hidden_size": (1, 8192), "depth": (1, 128), "num_heads": (1, 1024), "mlp_ratio": (0, 64),
          "context_dim": (1, 16384)}
MAX_MLP_WIDTH = 65536     # hidden_size * mlp_ratio
MAX_PATCH_VALUES = 16384  # channels * patch_size ** 2: the values of one patch, in and out


@dataclass
class DiTConfig:
    """Architecture of a `DiT` (defaults: DiT-XL/2 on 32x32 latents, no text conditioning).

    `input_size` is the latent side trained at; any H, W divisible by `patch_size` run.
    `out_channels` None means `in_channels`. `context_dim` adds cross-attention on the context tokens
    (then context is required); `pool_context` also adds an MLP of their mean to the timestep embedding.
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int | None = None
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    context_dim: int | None = None
    pool_context: bool = False
    use_checkpoint: bool = False

    def __post_init__(self) -> None:
        coerce_numbers(self, "dit")
        if self.out_channels is None:
            self.out_channels = self.in_channels
        for name in ("out_channels", "context_dim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"dit config: {name} must be a whole number >= 1 or null, got {value!r}")
        for name in ("pool_context", "use_checkpoint"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"dit config: {name} must be true or false, got {getattr(self, name)!r}")
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise InputError(f"dit config: {name} must be >= 1, got {getattr(self, name)}")
        check_range(self, "dit config", BOUNDS)
        if self.hidden_size * self.mlp_ratio > MAX_MLP_WIDTH:
            raise InputError(f"dit config: hidden_size x mlp_ratio = {self.hidden_size * self.mlp_ratio:g} is more than "
                             f"{MAX_MLP_WIDTH}; lower mlp_ratio (DiT: 4)")
        if max(self.in_channels, self.out_channels) * self.patch_size ** 2 > MAX_PATCH_VALUES:
            raise InputError(f"dit config: {max(self.in_channels, self.out_channels)} channels in patches of "
                             f"{self.patch_size}x{self.patch_size} are more than {MAX_PATCH_VALUES} values per patch")
        if self.input_size % self.patch_size:
            raise InputError(f"dit config: input_size {self.input_size} is not divisible by patch_size "
                             f"{self.patch_size}; use a multiple of it")
        if self.hidden_size % self.num_heads:
            raise InputError(f"dit config: hidden_size {self.hidden_size} does not split into {self.num_heads} "
                             "heads; use a multiple of num_heads")
        if self.hidden_size % 4:
            raise InputError(f"dit config: hidden_size must be divisible by 4 (sin and cos for each of the two "
                             f"axes of the position embedding), got {self.hidden_size}")
        if int(self.hidden_size * self.mlp_ratio) < 1:
            raise InputError(f"dit config: mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.pool_context and self.context_dim is None:
            raise InputError("dit config: pool_context needs context_dim (the width of the context tokens)")

    @property
    def latent_multiple(self) -> int:
        """Latent sides must be multiples of the patch size."""
        return self.patch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiTConfig":
        """Build from `to_dict` output, or from `size` (a key of DIT_SIZES) plus fields that override it."""
        require_mapping(d, "dit config")
        known = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(d) - set(known) - {"size"})
        if unknown:
            raise InputError(f"dit config: unknown keys {unknown}; valid keys are {['size'] + known}")
        d = dict(d)
        if "size" in d:
            size = d.pop("size")
            if not isinstance(size, str) or size not in DIT_SIZES:
                raise InputError(f"dit config: size {size!r} is unknown; choose one of {list(DIT_SIZES)}")
            d = {**DIT_SIZES[size], **d}
        elif not {"hidden_size", "depth", "num_heads"} <= set(d):
            # An explicit config says what it builds, instead of silently meaning the 675M-parameter XL.
            raise InputError(f"dit config: the model size is unknown; give size (one of {list(DIT_SIZES)}) "
                             "or hidden_size, depth and num_heads")
        return cls(**d)

    @classmethod
    def named(cls, name: str, **overrides: Any) -> "DiTConfig":
        """A size of the paper (`DiTConfig.named("DiT-XL/2", context_dim=1024)`), fields overridden."""
        return cls.from_dict({"size": name, **overrides})


def sincos_2d_position_embedding(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed [grid_h * grid_w, dim] position embedding of row-major tokens, float32.

    DiT's (MAE's) `get_2d_sincos_pos_embed`, for any grid: the first half of the channels encodes the
    column, the second the row, each as [sin, cos] at frequencies 10000 ** (-i / (dim / 4)).
    """
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)
    return torch.cat([axis(cols), axis(rows)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive layer norm's affine part, x * (1 + scale) + shift, per sample (DiT sec. 3.2)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Mlp(nn.Module):
    """Pointwise feed-forward: linear -> GELU (tanh approximation, as DiT) -> linear."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block (DiT Fig. 3): gated self-attention, cross-attention (PixArt-alpha), gated MLP."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        width, heads = config.hidden_size, config.num_heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = CrossAttention(width, heads=heads, dim_head=width // heads)
        self.norm_cross: nn.Module | None = None
        self.cross_attn: CrossAttention | None = None
        if config.context_dim is not None:
            self.norm_cross = nn.LayerNorm(width, eps=1e-6)
            self.cross_attn = CrossAttention(width, config.context_dim, heads=heads, dim_head=width // heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * config.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        self.use_checkpoint = config.use_checkpoint

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, c, context, use_reentrant=False)
        return self._forward(x, c, context)

    def _forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), context)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear to patch_size**2 * out_channels per token."""

    def __init__(self, width: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """The DiT denoiser: forward(x [B,C,H,W], timesteps [B], context [B,T,context_dim]) -> [B,C_out,H,W].

    H and W must be divisible by patch_size. Initialised as DiT (sec. 3.2, "adaLN-Zero"): every block
    starts as the identity and the output is exactly zero.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = cfg = config
        width = cfg.hidden_size
        self.x_embedder = nn.Conv2d(cfg.in_channels, width, cfg.patch_size, stride=cfg.patch_size)
        self.t_embedder = nn.Sequential(nn.Linear(FREQUENCY_DIM, width), nn.SiLU(), nn.Linear(width, width))
        self.context_pool: nn.Module | None = None
        if cfg.pool_context:
            self.context_pool = nn.Sequential(nn.Linear(cfg.context_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(width, cfg.patch_size, cfg.out_channels)
        self._pos_embed: dict[tuple[int, int, torch.device], torch.Tensor] = {}  # fixed, per grid and device
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's `initialize_weights`, plus PixArt-alpha's zero cross-attention output projection."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.x_embedder.weight.view(self.x_embedder.weight.shape[0], -1))  # as a linear
        nn.init.zeros_(self.x_embedder.bias)
        mlps = [self.t_embedder] + ([self.context_pool] if self.context_pool is not None else [])
        for mlp in mlps:
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        zero = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for block in self.blocks:
            zero.append(block.adaLN_modulation[-1])
            if block.cross_attn is not None:
                zero.append(block.cross_attn.to_out[0])
        for linear in zero:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def pos_embed(self, grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor:
        key = (grid_h, grid_w, device)
        if key not in self._pos_embed:
            self._pos_embed[key] = sincos_2d_position_embedding(self.config.hidden_size, grid_h, grid_w).to(device)
        return self._pos_embed[key]

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Predict from noisy latents `x` at `timesteps` (a scalar applies to the whole batch).

        Inputs are cast to the weights' dtype; the output has the dtype of `x`.
        """
        cfg = self.config
        if cfg.context_dim is None and context is not None:
            raise InputError("DiT: this model has no cross-attention (context_dim is null); pass no context")
        if cfg.context_dim is not None and (context is None or context.ndim != 3 or context.shape[-1] != cfg.context_dim):
            got = None if context is None else list(context.shape)
            raise InputError(f"DiT: context [B, T, {cfg.context_dim}] (text embeddings) is required, got {got}")
        batch, _, height, width = x.shape
        p = cfg.patch_size
        if height % p or width % p:
            raise InputError(f"DiT: latent height and width must be divisible by the patch size {p}, "
                             f"got {[height, width]}")
        dtype = self.x_embedder.weight.dtype
        tokens = self.x_embedder(x.to(dtype)).flatten(2).transpose(1, 2)  # [B, N, D], patches row-major
        tokens = tokens + self.pos_embed(height // p, width // p, x.device).to(dtype)
        c = self.t_embedder(timestep_embedding(timesteps.expand(batch), FREQUENCY_DIM).to(dtype))
        if context is not None:
            context = context.to(dtype)
            if self.context_pool is not None:  # a pooled text embedding joins the timestep (SD3-style)
                c = c + self.context_pool(context.mean(dim=1))
        for block in self.blocks:
            tokens = block(tokens, c, context)
        tokens = self.final_layer(tokens, c)  # [B, N, p * p * C_out]
        return self.unpatchify(tokens, height // p, width // p).to(x.dtype)

    def unpatchify(self, tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """[B, h*w, p*p*C] -> [B, C, h*p, w*p], each token's channels laid out (p, p, C) as DiT."""
        p, channels = self.config.patch_size, self.config.out_channels
        x = tokens.reshape(tokens.shape[0], grid_h, grid_w, p, p, channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(tokens.shape[0], channels, grid_h * p, grid_w * p)
