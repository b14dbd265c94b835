"""Training data: image folders, image-caption and latent shards, resumable order."""
