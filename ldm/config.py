"""Typed configuration of a latent diffusion model: the autoencoder, the noise process, the
denoiser and the text encoder, each a typed section. It travels inside our checkpoints.

Config files in other dialects (the original LDM / SD YAML, our YAML layout, checkpoints written
before the sections were typed) are translated in `ldm.formats.configs`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from autoencoder.config import AutoencoderConfig
from common.config import check_keys, check_range, coerce_numbers, require_mapping
from common.errors import InputError
from ldm.conditioner import ConditionerConfig
from ldm.denoisers import DenoiserConfig, denoiser_config, denoiser_to_dict
from ldm.diffusion.parameterization import PARAMETERIZATIONS
from ldm.diffusion.schedule import BETA_SCHEDULES
from ldm.samplers.discretization import SPACINGS
from ldm.text import TextEncoderConfig

# Far above every real model (SD and DDPM: 1000 steps; SD 2.x 768-v: 96 x 96 latents) and far below what
# could not be held: a broken or hostile config inside a checkpoint is refused before the schedule (a table
# of `timesteps` entries) or anything else is allocated.
BOUNDS = {"timesteps": (1, 100_000), "image_size": (1, 4096)}


@dataclass
class LDMConfig:
    """Everything needed to rebuild a `LatentDiffusion`; travels inside our checkpoints."""

    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    parameterization: str = "eps"
    timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    linear_start: float = 0.00085
    linear_end: float = 0.012
    zero_terminal_snr: bool = False   # rescale the schedule to SNR 0 at the last step (Lin et al. 2023)
    image_size: int | None = None     # native latent size (64 for SD 1.x: 512 px); None: the autoencoder's
    # None means "not part of this model" (an autoencoder alone).
    denoiser: DenoiserConfig | None = None
    text_encoder: TextEncoderConfig | ConditionerConfig | None = None  # a conditioner: SDXL's text + sizes
    timestep_spacing: str | None = None  # the samplers' default spacing (None: each sampler's own; SDXL: "sgm")

    def __post_init__(self) -> None:
        if not isinstance(self.autoencoder, AutoencoderConfig):
            self.autoencoder = AutoencoderConfig.from_dict(self.autoencoder)
        if self.denoiser is not None and not isinstance(self.denoiser, DenoiserConfig):
            require_mapping(self.denoiser, "denoiser config")
            self.denoiser = denoiser_config(self.denoiser)
        if self.text_encoder is not None and not isinstance(self.text_encoder, (TextEncoderConfig, ConditionerConfig)):
            require_mapping(self.text_encoder, "text_encoder config")
            kind = ConditionerConfig if self.text_encoder.get("kind") == "conditioner" else TextEncoderConfig
            self.text_encoder = kind.from_dict(self.text_encoder)
        if self.timestep_spacing is not None and self.timestep_spacing not in SPACINGS:
            raise InputError(f"timestep_spacing {self.timestep_spacing!r} is not one of {', '.join(SPACINGS)}")
        coerce_numbers(self, "model")  # the sections checked their own numbers (finite ones) when built
        if not isinstance(self.zero_terminal_snr, bool):
            raise InputError(f"model config: zero_terminal_snr must be true or false, got {self.zero_terminal_snr!r}")
        if self.parameterization not in PARAMETERIZATIONS:
            raise InputError(f"parameterization {self.parameterization!r} is not one of {', '.join(PARAMETERIZATIONS)}")
        if self.zero_terminal_snr and self.parameterization == "eps":
            # at SNR 0 the noise is x_T itself, so eps says nothing of the image: x0 = (x - sqrt(1 - a) eps) / sqrt(a)
            # divides by 0 at the first sampling step (Lin et al. 2023, sec. 3.2: use v-prediction)
            raise InputError("model config: zero_terminal_snr needs parameterization v (or x0): an eps model cannot "
                             "recover the image at SNR 0; set parameterization: v")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise InputError(f"beta_schedule {self.beta_schedule!r} is not one of {', '.join(BETA_SCHEDULES)}")
        if self.timesteps < 1:
            raise InputError(f"timesteps must be >= 1, got {self.timesteps}")
        check_range(self, "model config", BOUNDS)
        for name in ("linear_start", "linear_end"):  # betas of the linear schedules: probabilities of noise
            if not 0 < getattr(self, name) < 1:
                raise InputError(f"{name} must be in (0, 1) (SD: 0.00085 and 0.012), got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["autoencoder"] = self.autoencoder.to_dict()
        d["denoiser"] = None if self.denoiser is None else denoiser_to_dict(self.denoiser)
        d["text_encoder"] = None if self.text_encoder is None else self.text_encoder.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LDMConfig":
        check_keys(cls, d, "model")  # also refuses a config that is no mapping (null, a list, a number)
        return cls(**d)
