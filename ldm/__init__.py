"""Latent diffusion: the diffusion model over autoencoder latents."""
from autoencoder.errors import InputError

from . import samplers
from .config import LDMConfig, load_ldm_config
from .loading import load_autoencoder, load_model, save_autoencoder, save_model
from .model import LatentDiffusion
from .schedule import NoiseSchedule

__all__ = ["InputError", "LDMConfig", "LatentDiffusion", "NoiseSchedule", "load_autoencoder", "load_ldm_config",
           "load_model", "samplers", "save_autoencoder", "save_model"]
