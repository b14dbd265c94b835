"""Typed configuration of the KL autoencoder (the "ddconfig" of the original code, plus embed_dim)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from common.config import check_keys, check_length, check_range, coerce_numbers, require_mapping, whole_numbers
from common.errors import InputError

# Bounds that every real first stage is far inside (SD 1.x/2.x/SDXL: ch 128, ch_mult [1, 2, 4, 4], 2 res
# blocks, 4 latent channels; SD3 / Flux: 16), so that a broken or hostile config inside a checkpoint is
# refused before anything is built instead of asking for terabytes.
MAX_WIDTH = 4096      # channels of any layer, ch * ch_mult[i] (real ones: 512); a 3x3 conv at 4096 is 0.6 GB
MAX_CHANNELS = 1024   # image and latent channels
BOUNDS = {"ch": (1, MAX_WIDTH), "ch_mult": (1, 64), "num_res_blocks": (1, 64), "in_channels": (1, MAX_CHANNELS),
          "out_ch": (1, MAX_CHANNELS), "z_channels": (1, MAX_CHANNELS), "embed_dim": (1, MAX_CHANNELS),
          "resolution": (1, 65536), "attn_resolutions": (0, 65536)}
MAX_LEVELS = 8        # len(ch_mult): a downsampling factor of at most 2 ** 7 = 128


def check_bounds(config: "AutoencoderConfig") -> None:
    """InputError for a size outside `BOUNDS` (entries of list fields each), more than `MAX_LEVELS` levels,
    or a layer wider than `MAX_WIDTH` channels."""
    check_range(config, "autoencoder config", BOUNDS)
    check_length(config.ch_mult, "autoencoder config", "ch_mult", 1, MAX_LEVELS)
    widest = config.ch * max(config.ch_mult)
    if widest > MAX_WIDTH:
        raise InputError(f"autoencoder config: ch x ch_mult gives layers of {widest} channels; at most {MAX_WIDTH}")


@dataclass
class AutoencoderConfig:
    """Architecture of an `AutoencoderKL`; field names follow the original `ddconfig`.

    The downsampling factor is f = 2 ** (len(ch_mult) - 1). `scale_factor` multiplies latents
    before diffusion (0.18215 for Stable Diffusion; 1/std of the latents for a new autoencoder,
    see `tools/compute_scale_factor.py`).
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 256
    z_channels: int = 4
    embed_dim: int = 4
    dropout: float = 0.0
    double_z: bool = True
    scale_factor: float = 0.18215

    def __post_init__(self) -> None:
        coerce_numbers(self, "autoencoder")
        self.ch_mult = whole_numbers(self.ch_mult, "autoencoder config", "ch_mult")
        self.attn_resolutions = whole_numbers(self.attn_resolutions, "autoencoder config", "attn_resolutions")
        if not self.ch_mult:
            raise InputError("autoencoder config: ch_mult must name at least one level, e.g. [1, 2, 4, 4]")
        for name in ("ch", "num_res_blocks", "in_channels", "out_ch", "z_channels", "embed_dim"):
            if getattr(self, name) < 1:
                raise InputError(f"autoencoder config: {name} must be >= 1, got {getattr(self, name)}")
        check_bounds(self)
        if self.ch % 32 or any((self.ch * m) % 32 for m in self.ch_mult):
            raise InputError(
                f"autoencoder config: ch={self.ch} x ch_mult={list(self.ch_mult)} must give channel counts "
                "divisible by 32 (GroupNorm uses 32 groups); use ch = 32, 64, 128, ...")
        if not self.double_z:
            raise InputError("autoencoder config: double_z must be true for a KL autoencoder (mean and logvar)")
        if self.scale_factor <= 0:
            raise InputError(f"autoencoder config: scale_factor must be > 0, got {self.scale_factor}")
        if not 0 <= self.dropout < 1:
            raise InputError(f"autoencoder config: dropout must be in [0, 1), got {self.dropout}")

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AutoencoderConfig":
        """Build from our dict or an original `ddconfig` (extra original-only keys are refused by name)."""
        require_mapping(d, "autoencoder config")
        # Original ddconfig keys we accept only at the value every SD first stage uses.
        fixed = {"resamp_with_conv": True, "attn_type": "vanilla", "use_linear_attn": False,
                 "give_pre_end": False, "tanh_out": False}
        for key, value in fixed.items():
            if key in d and d[key] != value:
                raise InputError(f"autoencoder config: {key}={d[key]!r} is not supported (only {value!r})")
        d = {k: v for k, v in d.items() if k not in fixed}
        check_keys(cls, d, "autoencoder")
        return cls(**d)
