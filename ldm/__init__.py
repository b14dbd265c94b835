"""Latent diffusion: the diffusion model over autoencoder latents."""
