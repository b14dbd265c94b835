"""AutoencoderKL: the first stage of latent diffusion (LDM paper, sec. 3)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from autoencoder.config import AutoencoderConfig
from autoencoder.distributions import DiagonalGaussian
from autoencoder.modules import Decoder, Encoder, is_channels_last
from autoencoder.tiling import tiled_apply
from common.errors import InputError


@dataclass
class TilingConfig:
    """Tile sizes in latent pixels; images are tiled at `f` times these."""

    tile_latent: int = 64
    overlap_latent: int = 16


def _nearest_multiples(n: int, f: int) -> str:
    lower, upper = n // f * f, (n // f + 1) * f
    return f"{lower} or {upper}" if lower > 0 else f"{upper}"


class AutoencoderKL(nn.Module):
    """Encoder -> quant_conv -> diagonal Gaussian posterior; z -> post_quant_conv -> Decoder.

    Parameter names are those of the original `ldm.models.autoencoder.AutoencoderKL`.
    Images are in [-1, 1]; `scale_factor` is applied by the diffusion model, not here.
    """

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)
        self.tiling: TilingConfig | None = None
        self._warned_upcast = False

    @property
    def downsampling_factor(self) -> int:
        return self.config.downsampling_factor

    def enable_tiling(self, tile_latent: int = 64, overlap_latent: int = 16) -> None:
        """Encode and decode inputs larger than one tile tile by tile (for images beyond memory)."""
        if tile_latent < 1 or not 0 <= overlap_latent < tile_latent:
            raise InputError(
                f"tiling: need tile_latent >= 1 and 0 <= overlap_latent < tile_latent, got {tile_latent}, {overlap_latent}")
        self.tiling = TilingConfig(tile_latent, overlap_latent)

    def disable_tiling(self) -> None:
        self.tiling = None

    # -- checks --------------------------------------------------------------------------------
    def _check_image(self, x: torch.Tensor) -> None:
        f, c = self.downsampling_factor, self.config.in_channels
        if x.ndim != 4:
            raise InputError(f"autoencoder input must be a batch of images (B, {c}, H, W); got shape {tuple(x.shape)}")
        if x.shape[1] != c:
            hint = " (an RGBA or grayscale image? convert it to RGB)" if c == 3 else ""
            raise InputError(f"autoencoder expects {c} input channels, got {x.shape[1]}{hint}")
        h, w = x.shape[2], x.shape[3]
        if h % f or w % f:
            raise InputError(
                f"image size {h}x{w} (HxW) is not divisible by the autoencoder's downsampling factor {f}: "
                f"resize or crop to height {_nearest_multiples(h, f)} and width {_nearest_multiples(w, f)}")

    def _check_latent(self, z: torch.Tensor) -> None:
        c = self.config.embed_dim
        if z.ndim != 4 or z.shape[1] != c:
            raise InputError(f"autoencoder latents must have shape (B, {c}, h, w); got {tuple(z.shape)}")

    # -- encode / decode -----------------------------------------------------------------------
    def _encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        if is_channels_last(self.encoder.conv_in.weight):
            return self.quant_conv(self.encoder(x.contiguous(memory_format=torch.channels_last))).contiguous()
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images (B, C, H, W) in [-1, 1] -> posterior over latents (B, embed_dim, H/f, W/f)."""
        self._check_image(x)
        f = self.downsampling_factor
        if self.tiling is not None and max(x.shape[2:]) > self.tiling.tile_latent * f:
            moments = tiled_apply(self._encode_moments, x, tile_size=self.tiling.tile_latent * f,
                                  overlap=self.tiling.overlap_latent * f, scale=1.0 / f, align=f)
        else:
            moments = self._encode_moments(x)
        return DiagonalGaussian(moments)

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        if is_channels_last(self.decoder.conv_in.weight):
            return self.decoder(self.post_quant_conv(z).contiguous(memory_format=torch.channels_last)).contiguous()
        return self.decoder(self.post_quant_conv(z))

    def _decode_tiles(self, z: torch.Tensor) -> torch.Tensor:
        if self.tiling is not None and max(z.shape[2:]) > self.tiling.tile_latent:
            return tiled_apply(self._decode_raw, z, tile_size=self.tiling.tile_latent,
                               overlap=self.tiling.overlap_latent, scale=float(self.downsampling_factor))
        return self._decode_raw(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, embed_dim, h, w) -> images (B, out_ch, h*f, w*f), roughly in [-1, 1].

        In half precision the decoder's activations can overflow to inf (the known cause of black
        images); then this decodes again in float32 and returns that result.
        """
        self._check_latent(z)
        out = self._decode_tiles(z)
        if out.dtype != torch.float32 or torch.is_autocast_enabled():
            if not bool(torch.isfinite(out).all()):
                if not self._warned_upcast:
                    warnings.warn("autoencoder decode overflowed in half precision; decoding in float32 instead",
                                  stacklevel=2)
                    self._warned_upcast = True
                out = self._decode_float32(z).to(out.dtype)
        return out

    def _decode_float32(self, z: torch.Tensor) -> torch.Tensor:
        dtype = next(self.parameters()).dtype
        device_type = z.device.type
        try:
            self.float()
            with torch.autocast(device_type=device_type, enabled=False):
                return self._decode_tiles(z.float())
        finally:
            self.to(dtype)

    def forward(self, x: torch.Tensor, *, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct `x`; returns (reconstruction, posterior), as the original `forward`."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    @property
    def last_layer(self) -> torch.Tensor:
        return self.decoder.last_layer
