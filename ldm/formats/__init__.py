"""File formats: original SD configs and key layouts, config dialects, load_model / save_model."""
