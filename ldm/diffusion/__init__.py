"""The noise process: schedules, the forward process, parameterizations and the training loss (no weights)."""
