"""Ray Train: the distributed training loop, checkpoints, and the driver that runs it."""
