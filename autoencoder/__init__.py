"""The KL-regularized first-stage autoencoder: images <-> latents."""
from .config import AutoencoderConfig
from .distributions import DiagonalGaussian
from .errors import InputError
from .model import AutoencoderKL

__all__ = ["AutoencoderConfig", "AutoencoderKL", "DiagonalGaussian", "InputError"]
