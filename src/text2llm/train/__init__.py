"""Training: the loop (trainer.py), optimizer and LR schedules (optim.py), checkpoints
(checkpoint.py) and torchrun / DDP / FSDP2 wrapping (distributed.py)."""
