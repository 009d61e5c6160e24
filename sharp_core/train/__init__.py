"""Set-up, the micro-step, the loop, its state and checkpoints, distributed training, launch."""
