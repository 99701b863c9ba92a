"""Training: the loop (trainer.py), optimizer and LR schedules (optim.py), checkpoints
(checkpoint.py), torchrun / DDP / FSDP2 wrapping (distributed.py) and MFU (mfu.py).

``from text2llm.train import train`` is :func:`text2llm.train.trainer.train`; it is imported on
first use so that reading configs does not import torch.
"""

_LAZY = {"train", "train_from_cli", "TrainResult"}


def __getattr__(name):
    if name in _LAZY:
        from text2llm.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'text2llm.train' has no attribute {name!r}")
