"""Training: the one trainer for every objective, its run plan, optimizers, checkpoints and metric sinks."""
