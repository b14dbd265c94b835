"""Training: config, distributed setup, the trained module, EMA, checkpoints, metric logs."""
