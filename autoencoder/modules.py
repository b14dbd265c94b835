"""Encoder and Decoder of the KL autoencoder.

Module and parameter names match the original first stage
(`ldm/modules/diffusionmodules/model.py` of CompVis latent-diffusion / Stable Diffusion), so that the
`first_stage_model.*` weights of SD 1.x/2.x checkpoints load with no renaming.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autoencoder.config import AutoencoderConfig


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether a 4-D tensor (map or conv weight) is laid out channels-last (and not also NCHW-contiguous).

    A model moved with `.to(memory_format=torch.channels_last)` has such conv weights; its forward
    then lays its input out the same way (mixing the layouts makes every conv re-lay-out one side).
    """
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def normalize(channels: int) -> nn.GroupNorm:
    # The first stage uses eps 1e-6 (the UNet uses 1e-5).
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding (right and bottom only), as in the original.
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Without autograd, SiLU and the residual add reuse their input's memory, and each step frees
        # the last: at 2048 px the decoder's maps are GiB-sized, and each copy saved is one of them.
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h = F.silu(self.norm2(h), inplace=inplace)
        h = self.conv2(self.dropout(h))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return h.add_(x) if inplace and h.dtype == x.dtype else x + h  # (autocast may mix dtypes: x + h promotes)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections (original `AttnBlock`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = normalize(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, height, width = h.shape
        # (b, 1, hw, c): one head; SDPA's default scale is c ** -0.5, as in the original. Channels must be
        # the contiguous dimension: on a strided view SDPA falls back to its math kernel on the CPU, which
        # holds the whole hw x hw matrix (16 GiB at 2048 px) where the flash kernel holds a block of it.
        q, k, v = (proj(h).reshape(b, 1, c, height * width).transpose(2, 3).contiguous()
                   for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(2, 3).reshape(b, c, height, width)
        return x + self.proj_out(h)


def _mid_block(channels: int, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2*z_channels, H/f, W/f)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        ch, ch_mult = config.ch, config.ch_mult
        self.num_res_blocks = config.num_res_blocks
        self.conv_in = nn.Conv2d(config.in_channels, ch, kernel_size=3, stride=1, padding=1)
        resolution = config.resolution
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            block_in, block_out = ch * in_ch_mult[level], ch * mult
            down = nn.Module()
            down.block = nn.ModuleList()
            down.attn = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out, config.dropout))
                block_in = block_out
                if resolution in config.attn_resolutions:
                    down.attn.append(AttnBlock(block_in))
            if level != len(ch_mult) - 1:
                down.downsample = Downsample(block_in)
                resolution //= 2
            self.down.append(down)
        self.mid = _mid_block(block_in, config.dropout)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * config.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            for i, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[i](h)
            if level != len(self.down) - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled()))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        ch, ch_mult = config.ch, config.ch_mult
        block_in = ch * ch_mult[-1]
        resolution = config.resolution // config.downsampling_factor
        self.conv_in = nn.Conv2d(config.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _mid_block(block_in, config.dropout)
        # Built from the lowest resolution up but stored in level order (up[0] is full resolution),
        # exactly as the original does with `insert(0, ...)`, so the parameter names match.
        ups: list[nn.Module] = []
        for level in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[level]
            up = nn.Module()
            up.block = nn.ModuleList()
            up.attn = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out, config.dropout))
                block_in = block_out
                if resolution in config.attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if level != 0:
                up.upsample = Upsample(block_in)
                resolution *= 2
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[i](h)
            if level != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled()))

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the last conv: the adaptive GAN weight is computed from gradients here."""
        return self.conv_out.weight
