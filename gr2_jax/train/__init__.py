"""Training utilities: checkpoints."""
