"""TrainConfig: the training loop's settings (the ``[train]`` table)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    seed: int = Field(1337, description="seed for init, data order and dropout")
    max_steps: int = Field(1800, ge=1, description="optimizer steps to train")
    batch_size: int = Field(16, ge=1, description="sequences per micro-batch (per process)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    seq_len: int = Field(256, ge=2, description="tokens per training sequence (<= model.max_seq_len)")
    lr: float = Field(3e-3, gt=0, le=10, description="peak learning rate")
    min_lr: float = Field(3e-4, ge=0, description="learning rate at the end of the cosine decay")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps")
    schedule: Literal["cosine", "constant", "wsd"] = Field("cosine", description="LR schedule after warm-up")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of steps spent in the final decay")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (matrices only; not norms, biases, embeddings)")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="clip the global grad norm to this (0 = off)")
    eval_every: int = Field(200, ge=0, description="evaluate on the val shards every N steps (0 = only at the end)")
    eval_batches: int = Field(20, ge=1, description="batches per evaluation")
    checkpoint_every: int = Field(0, ge=0, description="save a checkpoint every N steps (0 = only at the end)")
    keep_last: int = Field(2, ge=1, description="keep the last K checkpoints (plus the best by val loss)")
    log_every: int = Field(10, ge=1, description="append to metrics.jsonl every N steps")
    sample_every: int = Field(0, ge=0, description="append a generated sample to samples.txt every N steps (0 = at evals)")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="auto = cuda if available, else cpu")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto = bf16 autocast on GPUs that support it, fp32 on CPU")
    compile: bool = Field(False, description="torch.compile the model (slow first step; see benchmarks/train.py)")
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = leave torch's default)")
    distributed: Literal["auto", "none", "ddp", "fsdp"] = Field("auto", description="auto = ddp under torchrun with >1 process")
    max_bad_steps: int = Field(5, ge=1, description="stop after this many steps with a non-finite loss or gradient")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr ({self.min_lr}) must be <= train.lr ({self.lr})")
        return self
