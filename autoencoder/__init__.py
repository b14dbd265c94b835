"""The KL-regularized first-stage autoencoder: images <-> latents."""
from autoencoder.config import AutoencoderConfig
from autoencoder.distributions import DiagonalGaussian
from common.errors import InputError
from autoencoder.model import AutoencoderKL

__all__ = ["AutoencoderConfig", "AutoencoderKL", "DiagonalGaussian", "InputError"]
