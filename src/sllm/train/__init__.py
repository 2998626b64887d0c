"""Pre-training: the loop, optimizers and schedules, checkpoints, and metric sinks."""
