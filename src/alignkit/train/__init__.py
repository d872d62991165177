"""Training: the one loop, checkpoints, metrics, cached reference log-probs."""
