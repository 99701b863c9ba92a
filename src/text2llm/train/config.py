"""TrainConfig: the training loop's settings (the ``[train]`` table).

Batch geometry::

    tokens per optimizer step = batch_size * seq_len * grad_accum * dp     (dp = processes / (tp * pp))

Set ``tokens_per_step`` to fix the left side instead of ``grad_accum``: the trainer then picks
``grad_accum`` for the number of processes it runs on (it must divide evenly), so the same config
trains the same model on 1 CPU or 8 GPUs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from text2llm.errors import UserError


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # ---- what and how long -----------------------------------------------------------------
    seed: int = Field(1337, description="seed for init, data order and dropout")
    max_steps: int = Field(1500, ge=1, description="optimizer steps to train")
    init_from: str = Field("", description="start from this checkpoint's weights (fresh optimizer, step 0); '' = random init")
    # ---- batch geometry ----------------------------------------------------------------------
    batch_size: int = Field(16, ge=1, description="sequences per micro-batch (per process)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step (ignored when tokens_per_step > 0)")
    tokens_per_step: int = Field(0, ge=0, description="target tokens per optimizer step over all processes; "
                                 "0 = batch_size * seq_len * grad_accum * world_size")
    seq_len: int = Field(256, ge=2, description="tokens per training sequence (<= model.max_seq_len)")
    loader: Literal["random", "bos"] = Field("random", description="train batches: random = windows at random "
                                             "offsets of the token stream; bos = every row starts at a document "
                                             "start, documents packed best-fit (nanochat; packed shards only)")
    document_mask: bool = Field(False, description="stop attention across the documents packed into one sequence")
    # ---- optimizer and schedule ---------------------------------------------------------------
    optimizer: Literal["adamw", "muon"] = Field("adamw", description="adamw: AdamW on every parameter; muon: "
                                                "torch.optim.Muon on the hidden matrices (attention, MLPs, experts) "
                                                "and AdamW on embeddings, head, router, gains and biases")
    muon_lr: float = Field(0.02, gt=0, le=10, description="muon: peak learning rate of the Muon part (same "
                           "schedule shape as lr, decaying to the same fraction min_lr / lr)")
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="muon: Nesterov momentum of the Muon part")
    muon_weight_decay: float = Field(0.0, ge=0, description="muon: decoupled weight decay of the Muon part "
                                     "(weights *= 1 - lr * wd each step)")
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = Field(
        "original", description="muon: per-matrix LR scale: original = sqrt(max(1, rows / cols)) (Keller Jordan); "
                                "match_rms_adamw = 0.2 sqrt(max(rows, cols)) (Moonshot; then muon_lr ~ lr)")
    lr: float = Field(3e-3, gt=0, le=10, description="peak learning rate")
    min_lr: float = Field(3e-4, ge=0, description="learning rate at the end of the cosine / wsd decay")
    warmup_steps: int = Field(50, ge=0, description="linear warm-up steps")
    schedule: Literal["cosine", "constant", "wsd"] = Field("cosine", description="LR schedule after warm-up: "
                                                          "cosine to min_lr, constant, or warmup-stable-decay")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of steps spent in the final linear decay")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay on matrices")
    decay_embeddings: bool = Field(False, description="also decay embedding tables (off: GPT-3 / Llama practice)")
    decay_norms_and_biases: bool = Field(False, description="also decay norm gains and biases (off by default)")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    grad_clip: float = Field(1.0, ge=0, description="clip the global grad norm to this (0 = off; the norm is logged either way)")
    time_budget_s: float = Field(
        330.0, ge=0,
        description="if > 0: after the first budget_probe_steps steps, measure the step time and lower max_steps so that "
                    "training (evals included) fits in this many seconds; the chosen max_steps is written to config.toml "
                    "(then 0 here), so checkpoints and --resume stay exact. 0 = train exactly max_steps")
    budget_probe_steps: int = Field(20, ge=2, description="steps timed before time_budget_s fixes max_steps")
    max_bad_steps: int = Field(5, ge=1, description="stop after this many steps with a non-finite loss or gradient (each is skipped)")
    # ---- evaluation, logging, samples ---------------------------------------------------------
    eval_every: int = Field(100, ge=0, description="evaluate on the val shards every N steps (0 = only at the end)")
    eval_batches: int = Field(10, ge=1, description="batches per evaluation")
    log_every: int = Field(10, ge=1, description="append to metrics.jsonl (and TensorBoard) every N steps")
    samples: int = Field(1, ge=0, description="generated samples appended to samples.txt at each evaluation (0 = none)")
    sample_tokens: int = Field(64, ge=1, description="new tokens per generated sample")
    tensorboard: bool = Field(True, description="write TensorBoard logs to RUN/tb when the tensorboard package is installed")
    plot: bool = Field(True, description="refresh RUN/loss.png (loss and LR curves) at every evaluation and at the end")
    peak_flops: float = Field(0.0, ge=0, description="device peak FLOP/s per process for MFU; 0 = spec sheet (GPU) "
                              "or a matmul benchmark measured once (CPU)")
    peak_cache: str = Field("", description="JSON file caching the measured CPU peak; '' = RUN/peak_flops.json")
    # ---- checkpoints ----------------------------------------------------------------------------
    checkpoint_every: int = Field(0, ge=0, description="save a checkpoint every N steps (0 = only at the end)")
    keep_last: int = Field(2, ge=1, description="keep the last K checkpoints")
    keep_best: bool = Field(True, description="also keep the checkpoint with the lowest val loss")
    # ---- device and parallelism ----------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="auto = cuda if available, else cpu")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto = bf16 autocast on GPUs that "
                                                               "support it, fp32 on CPU (no fast bf16 there); fp16 uses a grad scaler")
    compile: bool = Field(False, description="torch.compile the model (slow first step; see benchmarks/train.py)")
    threads: int = Field(0, ge=0, description="torch CPU threads per process (0 = leave torch's default)")
    distributed: Literal["auto", "none", "ddp", "fsdp"] = Field("auto", description="how the data-parallel dimension "
                                                                "runs: auto = ddp (fsdp when tp > 1); fsdp = FSDP2 "
                                                                "fully_shard per block")
    # ---- model parallelism (train/parallelize.py): data-parallel degree = processes / (tp * pp) ----
    tp: int = Field(1, ge=1, description="tensor-parallel degree: every weight matrix split over this many processes")
    pp: int = Field(1, ge=1, description="pipeline-parallel degree: the layer stack cut into stages on this many processes")
    pp_schedule: Literal["gpipe", "1f1b", "interleaved-1f1b"] = Field(
        "1f1b", description="pipeline schedule over the grad_accum micro-batches of a step")
    pp_stages_per_rank: int = Field(0, ge=0, description="pipeline stages each process holds; 0 = 1 "
                                    "(2 for interleaved-1f1b, which needs >= 2)")
    pp_split: list[int] = Field(default_factory=list, description="layers per pipeline stage, first to last; "
                                "[] = an even split")
    sequence_parallel: bool = Field(True, description="tp: shard the norms' activations along the sequence "
                                    "(train.seq_len must divide by tp)")
    loss_parallel: bool = Field(True, description="tp: cross-entropy on the vocab-sharded logits (no gathered logits)")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr ({self.min_lr}) must be <= train.lr ({self.lr})")
        if self.tokens_per_step and self.tokens_per_step % (self.batch_size * self.seq_len):
            raise ValueError(f"train.tokens_per_step ({self.tokens_per_step}) must be a multiple of "
                             f"train.batch_size * train.seq_len ({self.batch_size * self.seq_len})")
        return self

    def accum_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each of ``world_size`` data-parallel replicas."""
        if not self.tokens_per_step:
            return self.grad_accum
        micro = self.batch_size * self.seq_len * world_size
        if self.tokens_per_step % micro:
            raise UserError(f"train.tokens_per_step ({self.tokens_per_step}) is not a multiple of batch_size * "
                             f"seq_len * data-parallel degree ({micro}); change train.batch_size or the process count")
        return self.tokens_per_step // micro
