"""Training: config, distributed setup, the trained module, batches and conditioning, EMA, checkpoints, metric logs."""
