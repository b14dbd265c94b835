"""Project-wide foundations shared by `autoencoder` and `ldm`: the input error, config-section checks, safe checkpoint files."""
