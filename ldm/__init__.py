"""Latent diffusion: the diffusion model over autoencoder latents.

    image  -> autoencoder -> latent -> noise (diffusion/) -> denoiser (denoisers/) -> loss (training/)
    prompt -> text encoder (text/) -> context -> sampler (samplers/) -> decoder -> image (pipeline.py)
"""
from common.errors import InputError
from ldm import lora, pipeline, samplers
from ldm.config import LDMConfig
from ldm.diffusion.schedule import NoiseSchedule
from ldm.formats.configs import load_ldm_config
from ldm.formats.loading import load_autoencoder, load_model, save_autoencoder, save_model
from ldm.model import LatentDiffusion

__all__ = ["InputError", "LDMConfig", "LatentDiffusion", "NoiseSchedule", "load_autoencoder", "load_ldm_config",
           "load_model", "lora", "pipeline", "samplers", "save_autoencoder", "save_model"]
