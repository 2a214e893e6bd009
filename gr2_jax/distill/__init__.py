"""On-policy distillation helpers: depth-pruned students."""
