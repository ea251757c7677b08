"""Layer 6, train: the one training loop (anchor, expert, router tuning), checkpoints, FSDP2."""
