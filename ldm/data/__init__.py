"""Training data: image folders, image-caption and latent shards, aspect-ratio buckets, resumable order."""
