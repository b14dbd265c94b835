"""The KL-regularized first-stage autoencoder: images <-> latents."""
from autoencoder.config import AutoencoderConfig
from autoencoder.distributions import DiagonalGaussian
from autoencoder.model import AutoencoderKL
from common.errors import InputError

__all__ = ["AutoencoderConfig", "AutoencoderKL", "DiagonalGaussian", "InputError"]
