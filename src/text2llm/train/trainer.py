"""The training loop behind ``text2llm train`` and ``text2llm.train``.

One optimizer step on each of ``dp`` data-parallel replicas, with ``k`` micro-batches each::

    for each micro-batch i of k:   (no gradient sync until the last one)
        loss_i = sum of token cross-entropy / (target tokens of the whole global batch)  [+ MoE aux / k]
        backward(loss_i * dp)        # DDP / FSDP average gradients over replicas
    grad_norm = clip(global grad norm)          # logged every step it is logged
    skip the step if loss or grad_norm is non-finite (stop after train.max_bad_steps such steps)
    lr = schedule(step); AdamW step; zero grads

Under ``train.pp`` the k micro-batches go through a pipeline schedule instead of this loop (same
loss); see :mod:`text2llm.train.parallelize`.

Data: the train stream is cut into ``dp * k`` parts and micro-batch slot ``dp_rank * k + i``
always reads part ``dp_rank * k + i`` (``dp`` data-parallel replicas: the processes, or under
``train.tp`` / ``train.pp`` (:mod:`text2llm.train.parallelize`) processes / (tp * pp), every
process of a replica reading its slots). What a step sees depends only on the number of slots,
so 1 process with ``grad_accum=2`` computes the same steps as 2 processes with ``grad_accum=1``
(or as tp=2, or pp=2, with ``grad_accum=2``), and a run can resume on a different layout when
``dp * k`` stays the same.

Every ``log_every`` steps a line goes to ``metrics.jsonl`` (and TensorBoard); every
``eval_every`` steps the val split is evaluated (loss, perplexity, bits-per-byte), samples are
appended to ``samples.txt`` and ``loss.png`` is redrawn; checkpoints are written every
``checkpoint_every`` steps, at the end, and on Ctrl-C / SIGTERM. ``resume=True`` restores model,
optimizer, loader and RNG state: on CPU the continued run computes bitwise the same losses as an
uninterrupted one. A run dir that holds no checkpoint yet (the run was killed before its first)
is resumed from step 0 with its saved config.

Layout: :func:`train` resolves the config (vocab size from the token shards; the caller's config
is never modified), prepares the run dir and hands over to a :class:`Trainer`, which builds the
model, optimizer and loaders, restores a checkpoint, and runs the loop one optimizer step at a
time. The token loss itself is :mod:`text2llm.loss`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from text2llm.checkpoint import (WEIGHTS, best_checkpoint, load_weights, read_checkpoint_config, read_state,
                                 resolve_checkpoint)
from text2llm.config import load_config
from text2llm.errors import UserError
from text2llm.evaluate import loader_nll
from text2llm.files import check_output_dir, clear_dir
from text2llm.infer.generate import generate
from text2llm.infer.packing import pack_weights
from text2llm.loader import TokenLoader, document_attention_mask
from text2llm.loss import bits_per_byte, count_targets, token_nll_sum
from text2llm.metrics import METRICS, MetricsWriter, format_seconds, plot_curves, print_table, truncate_metrics
from text2llm.model.transformer import Transformer
from text2llm.pack import read_meta
from text2llm.tokenizer import Tokenizer
from text2llm.train import checkpoint as ckpt_mod
from text2llm.train import distributed as D
from text2llm.train import parallelize as P
from text2llm.train.materialize import materialize, meta_model
from text2llm.train.mfu import device_peak_flops
from text2llm.train.optim import make_optimizer, set_lr


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None = plain fp32. On CPU bf16 is usually far slower (no bf16 matmul units), so auto = fp32."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_loss: float | None
    val_bits_per_byte: float | None
    train_tokens_per_s: float
    params: int
    seconds: float
    last_checkpoint: Path | None
    history: list[dict] = field(default_factory=list)  # the records logged by this call
    best_checkpoint: Path | None = None
    mfu: float | None = None
    interrupted: str | None = None  # "SIGINT" / "SIGTERM" when a signal stopped the run
    skipped_steps: int = 0


# ---- one optimizer step's gradients ------------------------------------------------------------


@dataclass
class StepStats:
    loss: torch.Tensor  # this process's share of the global mean loss (all-reduce SUM -> global mean)
    aux_loss: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)


def forward_backward(fwd, batches, device: torch.device, amp_dtype: torch.dtype | None = None,
                     loss_fn: Callable | None = None, denom: float | None = None, world_size: int = 1,
                     sync: Callable | None = None, scaler=None, attn_mask_fn: Callable | None = None,
                     nll_fn: Callable = token_nll_sum) -> StepStats:
    """Accumulate the gradients of one optimizer step over ``batches`` [(x_BT, y_BT), ...].

    Default loss: the gradient of (sum of token cross-entropy over every micro-batch of every
    process) / ``denom``, the number of target tokens in the global batch, so padding and uneven
    micro-batches weigh each token the same (4 x micro-batch 2 == micro-batch 8). ``loss_fn(model,
    x, y) -> (loss, extras)`` replaces it (distillation); its losses are averaged over micro-batches.
    ``sync(is_last)`` returns a context that turns gradient sync off on all but the last micro-batch.
    ``world_size`` is the number of data-parallel replicas (whose gradients are averaged);
    ``nll_fn(logits, y)`` the summed token NLL (tensor parallel: over vocab-split logits).
    """
    k = len(batches)
    if denom is None:
        denom = world_size * sum(int(count_targets(y)) for _, y in batches)
    loss_acc = torch.zeros((), device=device)
    aux_acc = load_acc = None
    extras_acc: dict = {}
    for i, (x, y) in enumerate(batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        kwargs = {"attn_mask": attn_mask_fn(x)} if attn_mask_fn is not None else {}
        with sync(i == k - 1) if sync is not None else nullcontext():
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                if loss_fn is None:
                    out = fwd(x, **kwargs)
                    share = nll_fn(out.logits, y) / max(1.0, denom)
                    objective = share * world_size
                    if out.aux_loss is not None:
                        objective = objective + out.aux_loss / k
                        aux = out.aux_loss.detach().float() / k
                        aux_acc = aux if aux_acc is None else aux_acc + aux
                    load = getattr(out, "expert_load", None)
                    if load is not None:  # (layers, experts) assignment counts
                        load = load.detach().float()
                        load_acc = load if load_acc is None else load_acc + load
                else:
                    loss, extras = loss_fn(fwd, x, y)
                    share = loss / (k * world_size)
                    objective = loss / k
                    for name, v in (extras or {}).items():
                        v = v.detach().float() / k if torch.is_tensor(v) else v / k
                        extras_acc[name] = extras_acc.get(name, 0.0) + v
            (scaler.scale(objective) if scaler is not None else objective).backward()
        loss_acc += share.detach().float()
    return StepStats(loss=loss_acc, aux_loss=aux_acc, expert_load=load_acc, extras=extras_acc)


# ---- Ctrl-C / SIGTERM ----------------------------------------------------------------------------


class GracefulStop:
    """Turns the first SIGINT / SIGTERM into a flag that the loop checks after each step (it then
    saves a checkpoint and returns). A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signal: str | None = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


# ---- the run dir and the resolved config ---------------------------------------------------------


def _memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource  # Unix only

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except (ImportError, OSError):
        return float("nan")


def _with(cfg, section: str, **changes):
    """A copy of ``cfg`` with ``changes`` in one section; ``cfg`` itself is left as it is."""
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=changes)})


def _resolve_config(cfg, meta: dict, data_dir: Path):
    """The config the run uses: ``model.vocab_size`` 0 becomes the token shards' vocab size."""
    if cfg.model.vocab_size == 0:
        return _with(cfg, "model", vocab_size=meta["vocab_size"])
    if cfg.model.vocab_size < meta["vocab_size"]:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} < the tokenizer's {meta['vocab_size']} ({data_dir})")
    return cfg


def _resume_point(run_dir: Path, cfg, env: D.DistEnv) -> Path | None:
    """The checkpoint a resumed run continues from, or None for a run dir (config.toml and run.json)
    that holds no checkpoint yet -- a run killed before its first: it starts again from step 0."""
    try:
        return resolve_checkpoint(run_dir)
    except UserError:
        if not ((run_dir / "config.toml").is_file() and (run_dir / "run.json").is_file()):
            raise  # not a run dir at all
    if env.is_main:
        changed = _config_changes(run_dir, cfg)
        how = f"a changed config ({', '.join(changed[:6])})" if changed else "its saved config"
        print(f"note: {run_dir} holds no checkpoint yet; starting it from step 0 with {how}")
    return None


def _prepare_run_dir(run_dir: Path, cfg, resume: bool, overwrite: bool, env: D.DistEnv) -> Path | None:
    """Checks (every rank, read-only), then rank 0 clears / creates the dir. Returns the checkpoint to resume."""
    start_ckpt = _resume_point(run_dir, cfg, env) if resume else None
    if not resume:
        check_output_dir(run_dir, overwrite, hint="use --resume to continue it, or --overwrite")
    D.barrier(env)
    if env.is_main:
        if not resume and overwrite:
            clear_dir(run_dir)  # (creates it)
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
        if resume and start_ckpt is None:
            truncate_metrics(run_dir / METRICS, 0)  # the records of the killed attempt
    D.barrier(env)
    return start_ckpt


def _steps_within_budget(tc, step: int, elapsed_s: float, sec_per_step: float) -> int:
    """max_steps such that the remaining steps, evals included, end within ``tc.time_budget_s``.

    An eval batch costs about a third of a training micro-batch (forward only); 5% is kept in reserve.
    """
    eval_cost = tc.eval_batches * sec_per_step / (3 * tc.grad_accum) if tc.eval_every else 0.0
    per_step = sec_per_step + (eval_cost / tc.eval_every if tc.eval_every else 0.0)
    remaining = 0.95 * tc.time_budget_s - elapsed_s - eval_cost  # the final eval
    return int(min(tc.max_steps, max(step, step + remaining // per_step)))


def train(cfg, data_dir: str | Path, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
          progress: bool = True, loss_fn: Callable | None = None,
          init_from: str | Path | None = None) -> TrainResult:
    """Train ``cfg.model`` on the token shards in ``data_dir``; write the run into ``run_dir``.

    ``cfg`` is a :class:`text2llm.config.Config`; it is not modified (the run's resolved config,
    vocab size and a time budget's max_steps included, is ``RUN/config.toml``). ``loss_fn(model,
    x, y) -> (loss, extras)`` replaces the LM loss (distillation plugs in here); ``extras``
    (numbers or 0-d tensors) are logged. ``init_from`` (or ``train.init_from``) starts from a
    checkpoint's weights with a fresh optimizer at step 0; the model shape is ``cfg.model`` as
    given. Under torchrun every process calls this; rank 0 alone writes logs and checkpoints. A
    script of your own that trains with ``train.distributed=fsdp`` should end with ``os._exit``
    once its output is flushed, as the ``text2llm`` command does (why:
    ``text2llm.train.distributed.joined_process_group``).
    """
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    meta = read_meta(data_dir)
    cfg = _resolve_config(cfg, meta, data_dir)
    if resume and init_from:
        raise UserError("train: --resume and init_from exclude each other (init_from starts a new run at step 0)")
    threads_before = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)

    env = D.init_distributed(cfg.train)
    finished = False
    try:
        start_ckpt = _prepare_run_dir(run_dir, cfg, resume, overwrite, env)
        # a resumed run's weights come from its checkpoint; one that starts at step 0 may start from init_from
        init_from = None if start_ckpt is not None else (init_from or cfg.train.init_from or None)
        trainer = Trainer(cfg, meta, data_dir, run_dir, env, start_ckpt=start_ckpt, init_from=init_from,
                          loss_fn=loss_fn, progress=progress)
        result = trainer.run()
        finished = True
        return result
    finally:
        D.shutdown(env, barrier=finished)
        torch.set_num_threads(threads_before)  # a library call leaves the caller's setting as it was


# ---- the trainer ---------------------------------------------------------------------------------


@dataclass
class StepOutcome:
    """What the loop needs of one optimizer step that updated the weights."""

    loss: float  # the global mean loss
    lr: float
    grad_norm: float
    stats: StepStats
    stop: bool  # a signal reached some rank: save and stop


class Trainer:
    """One training run in ``run_dir``, from a resolved config; :meth:`run` trains it.

    Built in order (the order fixes the RNG stream, so it is part of exact resume): model and
    optimizer (:meth:`setup_model`), loaders (:meth:`setup_data`), the checkpoint's state
    (:meth:`resume`), metrics and samples (:meth:`setup_outputs`). ``self.cfg`` is replaced, never
    edited, when ``train.time_budget_s`` fixes ``max_steps`` (:meth:`fix_budget`).
    """

    def __init__(self, cfg, meta: dict, data_dir: Path, run_dir: Path, env: D.DistEnv, *,
                 start_ckpt: Path | None = None, init_from: str | Path | None = None, loss_fn: Callable | None = None,
                 progress: bool = True):
        self.cfg, self.meta, self.data_dir, self.run_dir, self.env = cfg, meta, data_dir, run_dir, env
        self.start_ckpt, self.loss_fn, self.progress = start_ckpt, loss_fn, progress
        tc, self.device = cfg.train, env.device
        self.amp_dtype = autocast_dtype(tc.precision, self.device)
        if self.amp_dtype is not None and self.device.type == "cpu" and env.is_main:
            print(f"warning: train.precision={tc.precision} on CPU: autocast to {self.amp_dtype} is usually much "
                  f"slower than fp32")
        self.k = tc.accum_steps(env.dp)
        self.slots = env.dp * self.k  # micro-batch slots per step: each data-parallel replica reads k
        self.write_config()
        if env.is_main:
            (run_dir / "run.json").write_text(json.dumps({"data": str(data_dir.resolve())}) + "\n", encoding="utf-8")
        self.tokenizer_dir = Path(meta["tokenizer_dir"]) if Path(meta.get("tokenizer_dir", "")).is_dir() else None
        self.padded = meta.get("mode") == "padded"  # targets hold IGNORE_INDEX: count real target tokens per step
        self.step, self.tokens_seen, self.bad_steps = 0, 0, 0
        self.history: list[dict] = []
        self.setup_model(init_from)
        self.setup_data()
        if start_ckpt is not None:
            self.resume(start_ckpt)
        self.setup_outputs()

    @property
    def tc(self):
        return self.cfg.train

    def write_config(self) -> None:
        self.config_toml = self.cfg.to_toml()
        if self.env.is_main:
            (self.run_dir / "config.toml").write_text(self.config_toml, encoding="utf-8")

    # ---- setup ----

    def setup_model(self, init_from: str | Path | None) -> None:
        """Model and optimizer: identical init on every rank. One process and DDP build the model
        eagerly and load weights before wrapping; FSDP2 / train.tp / train.pp build it on the meta
        device, split it (:mod:`text2llm.train.parallelize`) and wrap it, and each process then
        allocates and fills only its part (:mod:`text2llm.train.materialize`), with the same values."""
        tc, env = self.tc, self.env
        if tc.optimizer == "muon" and (env.mode == "fsdp" or env.model_parallel):
            raise UserError(f"train.optimizer = 'muon' runs on one process or DDP only: under "
                            f"{'FSDP2' if env.mode == 'fsdp' else 'train.tp / train.pp'} each process holds shards of "
                            "the matrices, and Muon orthogonalises whole matrices (it would need every gradient's "
                            "full_tensor() each step); use train.distributed = 'ddp' or train.optimizer = 'adamw'")
        P.check_layout(self.cfg.model, tc, env, self.k)
        self.sharded = env.mode == "fsdp" or env.model_parallel  # checkpoints through torch.distributed.checkpoint
        weights = None  # float weights to start from: init_from, or a plain checkpoint being resumed
        if init_from is not None:
            src = resolve_checkpoint(init_from)
            if not (src / WEIGHTS).is_file():
                raise UserError(f"{src}: init_from needs a float checkpoint with {WEIGHTS}")
            weights = src / WEIGHTS
        if self.start_ckpt is not None and not ckpt_mod.has_sharded_state(self.start_ckpt):
            weights = self.start_ckpt / WEIGHTS  # (sharded: loaded in place by resume)
        if self.sharded:  # built on the meta device, split, then each process allocates only its part
            model = meta_model(self.cfg.model)

            def fill(modules):
                materialize(modules, self.cfg.model, self.device, tc.seed, weights)
        else:
            torch.manual_seed(tc.seed)
            model = Transformer(self.cfg.model).to(self.device)
            if weights is not None:
                load_weights(model, weights)
        self.params = model.num_params()
        self.flops_per_token = model.flops_per_token(tc.seq_len)
        self.parallel = None
        if env.model_parallel:  # tp / pp (and DDP / FSDP2 on the dp dim)
            self.parallel = P.ParallelModel(model, tc, env, self.k, fill, self.document_mask_fn())
            self.model, self.fwd, parallel = self.parallel.module, self.parallel.fwd, self.parallel.dp_wrapper
        else:
            self.model = model
            self.fwd, parallel = D.wrap_model(model, env, compile=tc.compile)
            if self.sharded:
                fill([model])
        if env.rank // env.tp:
            torch.manual_seed(tc.seed + env.rank // env.tp)  # dropout differs between replicas and stages
        self.optimizer = make_optimizer(self.model, tc)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.sync = (lambda last: D.grad_sync(parallel, env, last)) if env.dp > 1 and parallel is not None else None

    def document_mask_fn(self):
        """``x_BT -> attention mask`` under train.document_mask (attention stops at each BOS), else None."""
        if not self.tc.document_mask:
            return None
        bos = self.meta.get("bos_id")
        return lambda x: document_attention_mask(x, bos)

    def setup_data(self) -> None:
        """Micro-batch slot p = dp_rank * k + i reads part p of ``slots`` parts of the train stream (the
        processes of one model replica, under tp / pp, read the same slots)."""
        tc, env, k = self.tc, self.env, self.k
        self.loaders = [TokenLoader(self.data_dir, "train", tc.batch_size, tc.seq_len, tc.loader, seed=tc.seed,
                                    rank=env.dp_rank * k + i, world_size=self.slots) for i in range(k)]
        self.attn_mask_fn = self.document_mask_fn()
        self.val_loader, self.val_shared = None, False
        self.val_info = self.meta["splits"].get("val", {"tokens": 0, "bytes": 0})
        if self.val_info["tokens"] > tc.seq_len:
            # too small to split: every rank scores it all
            self.val_shared = self.val_info["tokens"] // env.dp <= tc.seq_len
            r, w = (0, 1) if self.val_shared else (env.dp_rank, env.dp)
            self.val_loader = TokenLoader(self.data_dir, "val", tc.batch_size, tc.seq_len, "sequential", rank=r,
                                          world_size=w)

    def resume(self, ckpt: Path) -> None:
        """Optimizer, loader, RNG and grad-scaler state and the step counters of ``ckpt`` (and, from a
        sharded checkpoint, the weights: each process loads the chunks its shards need)."""
        env, k = self.env, self.k
        state = read_state(ckpt)
        saved_slots = state.get("loaders") or [state["loader"]]
        if len(saved_slots) != self.slots:
            raise UserError(
                f"{ckpt}: written with {len(saved_slots)} micro-batch slots per step (data-parallel replicas x "
                f"grad_accum); this run has {env.dp} x {k} = {self.slots}. Resume with the same product (set "
                f"train.tokens_per_step to keep it fixed across process counts)")
        if ckpt_mod.has_sharded_state(ckpt):  # model and optimizer shards, resharded onto this layout
            ckpt_mod.load_sharded_checkpoint(ckpt, self.model, self.optimizer)
        else:  # optimizer.pt: sharded layouts read it by parameter name
            osd = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location=self.device)
            saved = "muon" if set(osd) == {"muon", "adamw"} else "adamw"
            if saved != self.tc.optimizer:
                raise UserError(f"{ckpt}: its optimizer state is {saved}'s, and this run has train.optimizer = "
                                f"{self.tc.optimizer!r}; resume with train.optimizer={saved}, or start from its weights "
                                "with train.init_from (a fresh optimizer)")
            by_name = state.get("optimizer_format", "torch") == "fqn"  # (full, name-keyed: older sharded runs)
            if not by_name and self.sharded:
                osd, by_name = P.optimizer_state_by_name(osd), True
            if self.parallel is not None:
                self.parallel.load_optimizer_state(self.optimizer, osd)
            else:
                D.load_optimizer_state(self.model, self.optimizer, osd, by_name)
        for i, loader in enumerate(self.loaders):
            loader.load_state_dict(saved_slots[env.dp_rank * k + i])
        rngs = state.get("rng_ranks")
        same_layout = (rngs and len(rngs) == env.world_size and state.get("tp", 1) == env.tp
                       and state.get("pp", 1) == env.pp)
        ckpt_mod.set_rng_state(rngs[env.rank] if same_layout else state["rng"])
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.step, self.tokens_seen, self.bad_steps = state["step"], state["tokens_seen"], state.get("bad_steps", 0)
        if env.is_main:
            truncate_metrics(self.run_dir / METRICS, self.step)
            changed = _config_changes(ckpt, self.cfg)
            layout = [c for c in changed if c.split(":")[0] in LAYOUT_KEYS]
            changed = [c for c in changed if c not in layout]
            if layout:
                print(f"note: resuming {ckpt.name} on a different layout ({', '.join(layout)}): same weights, "
                      f"optimizer state and data order")
            if changed:
                print(f"note: resuming {ckpt.name} with a changed config ({', '.join(changed[:6])}); "
                      f"the continued run is not the one the checkpoint started")

    def setup_outputs(self) -> None:
        """Metrics writer, the device peak for MFU, and the tokenizer that writes samples."""
        tc, env = self.tc, self.env
        self.log = MetricsWriter(self.run_dir, enabled=env.is_main, tensorboard=tc.tensorboard)
        self.peak, self.peak_src = None, ""
        if env.is_main or self.device.type == "cuda":
            cache = Path(tc.peak_cache) if tc.peak_cache else self.run_dir / "peak_flops.json"
            self.peak, self.peak_src = device_peak_flops(self.device, tc.peak_flops, cache if env.is_main else None)
        self.tokens_per_step = tc.batch_size * tc.seq_len * self.k * env.dp
        self.tokenizer = None
        if self.tokenizer_dir is not None and tc.samples and env.model_parallel and env.is_main:
            print("note: train.samples are not written under train.tp / train.pp (the training layout shards the "
                  "sequence); generate from a checkpoint instead")
        elif self.tokenizer_dir is not None and tc.samples and (env.is_main or env.mode == "fsdp"):
            self.tokenizer = Tokenizer.load(self.tokenizer_dir)

    # ---- one step ----

    def optimizer_step(self, stopper: GracefulStop) -> StepOutcome | None:
        """One optimizer step (``self.step`` += 1); None when it was skipped (non-finite loss or gradient)."""
        tc, env, t0 = self.tc, self.env, time.perf_counter()
        lr = set_lr(self.optimizer, self.step, tc)
        batches = [next(loader) for loader in self.loaders]  # padded data: padding targets are IGNORE_INDEX
        max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        if self.parallel is None:
            stats = forward_backward(self.fwd, batches, self.device, self.amp_dtype, self.loss_fn,
                                     self._denom(batches), env.dp, self.sync, self.scaler, self.attn_mask_fn)
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            grad_norm = D.local_value(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        else:
            stats = self.parallel_forward_backward(batches)
            grad_norm = self.parallel.clip_grad_norm_(max_norm)
        self.stop_flag.fill_(1.0 if stopper.signal else 0.0)
        loss = stats.loss if env.holds_loss else torch.zeros_like(stats.loss)  # one process per replica reports
        shared = D.all_reduce_sum(torch.stack([loss, self.stop_flag]), env)
        loss, stop_any, gnorm = torch.stack([shared[0], shared[1], grad_norm.float().to(self.device)]).tolist()
        self.step += 1
        if not math.isfinite(loss) or (self.scaler is None and not math.isfinite(gnorm)):
            self._skip_step(loss, gnorm)
            return None
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens_seen += self.tokens_per_step
        self.train_seconds += time.perf_counter() - t0
        self.train_tokens += self.tokens_per_step
        return StepOutcome(loss, lr, gnorm, stats, bool(stop_any))

    def parallel_forward_backward(self, batches) -> StepStats:
        """One step's gradients under train.tp / train.pp: the pipeline schedule, or the usual
        accumulation over micro-batches with the (vocab-parallel) loss."""
        par, env = self.parallel, self.env
        if self.loss_fn is not None:
            raise UserError("train: a custom loss_fn (distillation) is not supported with train.tp / train.pp")
        if par.schedule is not None:
            loss, aux = par.pipeline_step(batches, self._denom(batches), self.amp_dtype)
            return StepStats(loss=loss, aux_loss=aux)
        with par.context():
            return forward_backward(self.fwd, batches, self.device, self.amp_dtype, None, self._denom(batches),
                                    env.dp, self.sync, None, self.attn_mask_fn, nll_fn=par.nll)

    def _denom(self, batches) -> float:
        """Target tokens of the whole global batch (only padded data has targets the loss ignores)."""
        if not self.padded:
            return float(self.tokens_per_step)
        local = float(sum(int(count_targets(y)) for _, y in batches)) if self.env.reads_new_data else 0.0
        return float(D.all_reduce_sum(torch.tensor(local, device=self.device), self.env))

    def _skip_step(self, loss: float, gnorm: float) -> None:
        """A non-finite step: drop its gradients; stop the run after ``train.max_bad_steps`` of them."""
        self.bad_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        limit = self.tc.max_bad_steps
        self.say(f"step {self.step}: non-finite {'loss' if not math.isfinite(loss) else 'gradient'} "
                 f"(loss={loss}, grad_norm={gnorm}); step skipped, weights unchanged ({self.bad_steps}/{limit} allowed)")
        if self.bad_steps >= limit:
            self.bar.close()
            self.log.close()
            raise UserError(
                f"train: stopped after {self.bad_steps} steps with a non-finite loss or gradient (train.max_bad_steps="
                f"{limit}); lower train.lr or check the data. Last good checkpoint: {self.last_ckpt}")

    def log_step(self, out: StepOutcome) -> None:
        now = time.perf_counter()
        tps = (self.tokens_seen - self.tokens_at_log) / max(1e-9, now - self.t_log)
        self.t_log, self.tokens_at_log = now, self.tokens_seen
        rec = {"step": self.step, "loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm, "tokens_per_s": tps,
               "tokens_seen": self.tokens_seen, "elapsed_s": now - self.t_start, "mem_mib": _memory_mib(self.device)}
        if self.peak:
            rec["mfu"] = tps * self.flops_per_token / (self.peak * self.env.world_size)
        rec.update(self._step_extras(out.stats))
        self.log.write(rec)
        self.history.append(rec)
        self.bar.set_postfix(loss=f"{out.loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)

    def _step_extras(self, stats: StepStats) -> dict:
        """MoE aux loss and expert load (all-reduced) and a custom loss_fn's extras."""
        env, rec = self.env, {}
        if stats.aux_loss is not None:
            rec["aux_loss"] = float(D.all_reduce_sum(stats.aux_loss.clone(), env)) / env.world_size
        if stats.expert_load is not None:  # share of routed tokens per expert, per MoE layer
            load = D.all_reduce_sum(stats.expert_load.clone(), env)
            share = load / load.sum(-1, keepdim=True).clamp(min=1)
            rec["expert_load"] = [[round(v, 4) for v in row] for row in share.reshape(-1, share.size(-1)).tolist()]
            rec["expert_load_max_ratio"] = float(share.max() * share.size(-1))  # 1.0 = perfectly balanced
        for name, v in stats.extras.items():
            rec[name] = float(v)
        return rec

    def fix_budget(self) -> None:
        """train.time_budget_s: max_steps from the probe steps' time, decided once and written to
        config.toml (time_budget_s 0 there), so checkpoints and --resume stay step-based and exact."""
        tc = self.tc
        # the step time leaves out the first step: its one-off costs (bf16 kernel set-up for Muon's Newton-Schulz
        # iterations, torch.compile) are already in the elapsed time and would not recur
        timed = max(1, self.step - self.start_step - 1)
        sec_per_step = (self.train_seconds - (self.first_step_s or 0.0)) / timed
        new_max = D.broadcast_object(_steps_within_budget(tc, self.step, time.perf_counter() - self.t_start,
                                                          sec_per_step), self.env)
        self.say(f"step {self.step}: train.time_budget_s={tc.time_budget_s:g} -> train.max_steps={new_max} "
                 f"(was {tc.max_steps})")
        self.cfg = _with(self.cfg, "train", max_steps=new_max, time_budget_s=0.0)
        self.write_config()
        self.bar.total = new_max

    # ---- evaluation, samples, checkpoints ----

    def evaluate(self) -> dict:
        """Val loss, perplexity and bits-per-byte over ``train.eval_batches`` batches (logged); {} without val data."""
        if self.val_loader is None:
            return {}
        if self.parallel is not None:  # the loss lives on one process per replica: always all-reduced
            nll, count = self.parallel.eval_nll(self.val_loader, self.tc.eval_batches, self.amp_dtype,
                                                self.attn_mask_fn)
            if self.val_shared and self.env.dp_rank:
                nll, count = nll.zero_(), count.zero_()
        else:
            nll, count = loader_nll(self.fwd, self.val_loader, self.tc.eval_batches, self.device, self.amp_dtype,
                                    self.attn_mask_fn)
        if not self.val_shared or self.parallel is not None:
            both = D.all_reduce_sum(torch.stack([nll, count]), self.env)
            nll, count = both[0], both[1]
        loss = float(nll / count.clamp(min=1))
        bpb = bits_per_byte(loss, self.val_info["tokens"], self.val_info["bytes"])  # the split's tokens per byte
        rec = {"step": self.step, "val_loss": loss, "val_perplexity": math.exp(min(loss, 50)), "val_bits_per_byte": bpb}
        self.log.write(rec)
        self.history.append(rec)
        return rec

    def write_samples(self) -> None:
        if self.tokenizer is None:
            return
        model, tokenizer, cfg, tc = self.model, self.tokenizer, self.cfg, self.tc
        device, amp_dtype = self.device, self.amp_dtype

        model.eval()
        texts = []
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            for i in range(tc.samples):
                texts.append(generate(model, tokenizer, cfg.generate.prompt, tc.sample_tokens,
                                      cfg.generate.temperature, cfg.generate.top_k, cfg.generate.top_p,
                                      seed=cfg.generate.seed + i))
        pack_weights(model, on=False)  # the generation engine packed the weights: free that copy
        model.train()
        if self.env.is_main:
            with open(self.run_dir / "samples.txt", "a", encoding="utf-8") as f:
                for t in texts:
                    f.write(f"--- step {self.step} ---\n{t}\n\n")

    def save(self, val: dict) -> Path | None:
        """A checkpoint of this step (every rank takes part; rank 0 writes all of it, or under a sharded
        layout each process its own shards and rank 0 the rest); its path on every rank."""
        env, tc = self.env, self.tc
        mine = [l.state_dict() for l in self.loaders] if env.reads_new_data else []  # one process per replica
        loader_states = [s for per_rank in D.all_gather_objects(mine, env) for s in per_rank]
        rngs = D.all_gather_objects(ckpt_mod.rng_state(), env)
        state = None
        if env.is_main:
            state = {"tokens_seen": self.tokens_seen, "loaders": loader_states, "rng": rngs[0], "rng_ranks": rngs,
                     "world_size": env.world_size, "grad_accum": self.k, "distributed": env.mode,
                     "tp": env.tp, "pp": env.pp, "optimizer_format": "dcp" if self.sharded else "torch",
                     "bad_steps": self.bad_steps,
                     "config_hash": self.cfg.hash(), "tokenizer": "tokenizer" if self.tokenizer_dir else None,
                     "val_loss": val.get("val_loss") if val.get("step") == self.step else None,
                     "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None}
        where = dict(config_toml=self.config_toml, tokenizer_dir=self.tokenizer_dir, keep_last=tc.keep_last,
                     keep_best=tc.keep_best, tie_embeddings=self.cfg.model.tie_embeddings)
        path = None
        if self.sharded:  # every process writes its shards; rank 0 the rest
            path = ckpt_mod.save_sharded_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state,
                                                    env=env, **where)
        elif env.is_main:  # one process, or DDP: rank 0 holds everything
            path = ckpt_mod.save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state, **where)
        path = D.broadcast_object(str(path) if path else None, env)
        return Path(path) if path else None

    def refresh_plot(self) -> None:
        if self.env.is_main and self.tc.plot:
            plot_curves(self.run_dir / METRICS, self.run_dir / "loss.png")

    # ---- the loop ----

    def run(self) -> TrainResult:
        """Train from ``self.step`` to ``train.max_steps`` (or a signal), then evaluate, save, summarize."""
        env = self.env
        self.bar = tqdm(total=self.tc.max_steps, initial=self.step, desc="train", unit="step",
                        disable=not (self.progress and env.is_main), mininterval=1.0, dynamic_ncols=True)
        self.say = tqdm.write if env.is_main else (lambda *_: None)
        self.last_eval: dict = {}
        self.last_ckpt = self.start_ckpt
        self.start_step = self.step
        self.t_start = time.perf_counter()
        self.t_log, self.tokens_at_log = self.t_start, self.tokens_seen
        self.train_seconds, self.train_tokens = 0.0, 0
        self.first_step_s = None  # the first step's time: one-off costs (kernel set-up, compilation)
        self.stop_flag = torch.zeros((), device=self.device)
        self.model.train()
        with GracefulStop() as stopper:
            while self.step < self.tc.max_steps:
                out = self.optimizer_step(stopper)
                self.bar.update(1)
                if out is None:  # skipped: nothing to log, evaluate or save
                    continue
                if self.step % self.tc.log_every == 0 or self.step == self.tc.max_steps or out.stop:
                    self.log_step(out)
                if out.stop:
                    self.say(f"step {self.step}: {stopper.signal or 'a signal on another rank'} received, "
                             f"saving a checkpoint")
                    break
                self.after_step()
            self.bar.close()
            interrupted = self.finish(stopper)
        self.log.close()
        return self.result(interrupted)

    def after_step(self) -> None:
        """The time-budget decision, and the periodic evaluation and checkpoint."""
        if self.first_step_s is None:
            self.first_step_s = self.train_seconds
        if self.tc.time_budget_s and self.step == self.start_step + self.tc.budget_probe_steps:
            self.fix_budget()
        tc, step = self.tc, self.step
        if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
            self.last_eval = self.evaluate()
            if self.last_eval:
                self.say(f"step {step}: val loss {self.last_eval['val_loss']:.4f}, "
                         f"bpb {self.last_eval['val_bits_per_byte']:.4f}")
            self.write_samples()
            self.refresh_plot()
        if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < tc.max_steps:
            self.last_ckpt = self.save(self.last_eval)

    def finish(self, stopper: GracefulStop) -> str | None:
        """The final evaluation and checkpoint (a stopped run only saves); the signal that stopped it, if any."""
        step = self.step
        interrupted = stopper.signal or (None if step >= self.tc.max_steps else "signal")
        if interrupted:
            if step != self.start_step or self.last_ckpt is None:
                self.last_ckpt = self.save(self.last_eval)
        else:
            self.last_eval = self.evaluate()
            self.write_samples()
            resumed_at_end = (self.last_ckpt is not None and self.last_ckpt.name == f"step_{step:07d}"
                              and step == self.start_step)  # nothing new to save
            if not resumed_at_end:
                self.last_ckpt = self.save(self.last_eval)
        self.refresh_plot()
        return interrupted

    def result(self, interrupted: str | None) -> TrainResult:
        env = self.env
        tps_all = self.train_tokens / max(1e-9, self.train_seconds)
        result = TrainResult(
            run_dir=self.run_dir, step=self.step,
            val_loss=self.last_eval.get("val_loss"), val_bits_per_byte=self.last_eval.get("val_bits_per_byte"),
            train_tokens_per_s=tps_all, params=self.params, seconds=time.perf_counter() - self.t_start,
            last_checkpoint=self.last_ckpt, history=self.history,
            best_checkpoint=best_checkpoint(self.run_dir) if env.is_main else None,
            mfu=tps_all * self.flops_per_token / (self.peak * env.world_size) if self.peak else None,
            interrupted=interrupted, skipped_steps=self.bad_steps,
        )
        if self.progress and env.is_main:
            _print_summary(result, env, self.k, self.peak, self.peak_src)
        return result


# how the run is spread over processes: changing these on --resume continues the same run
LAYOUT_KEYS = {f"train.{k}" for k in ("distributed", "tp", "pp", "pp_schedule", "pp_stages_per_rank", "pp_split",
                                       "sequence_parallel", "loss_parallel")}


def _config_changes(saved_dir: Path, cfg) -> list[str]:
    """``key: old -> new`` for every config value that differs from the one saved in ``saved_dir``
    (a checkpoint, or a run dir's config.toml)."""
    try:
        saved = read_checkpoint_config(saved_dir).to_dict()
    except UserError:
        return []

    def flat(d, prefix=""):
        for key, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", v

    old, new = dict(flat(saved)), dict(flat(cfg.to_dict()))
    return [f"{key}: {old.get(key)} -> {new.get(key)}" for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def _print_summary(r: TrainResult, env: D.DistEnv, k: int, peak, peak_src: str) -> None:
    rows = [("steps", f"{r.step:,}" + (f" (stopped by {r.interrupted})" if r.interrupted else "")),
            ("parameters", f"{r.params:,}"),
            ("processes x grad_accum", f"{env.world_size} x {k} ({env.mode}"
                                       + (f", tp={env.tp} pp={env.pp} dp={env.dp})" if env.model_parallel else ")")),
            ("tokens/s", f"{r.train_tokens_per_s:,.0f}")]
    if r.mfu is not None:
        rows.append(("MFU", f"{100 * r.mfu:.1f}% of {peak / 1e9:,.0f} GFLOP/s ({peak_src})"))
    if r.val_loss is not None:
        rows += [("val loss", f"{r.val_loss:.4f}"), ("val bits/byte", f"{r.val_bits_per_byte:.4f}")]
    if r.skipped_steps:
        rows.append(("skipped (non-finite) steps", str(r.skipped_steps)))
    rows += [("time", format_seconds(r.seconds)), ("last checkpoint", str(r.last_checkpoint))]
    if r.best_checkpoint is not None:
        rows.append(("best checkpoint", str(r.best_checkpoint)))
    print_table("text2llm train", rows)


def train_from_cli(config: str | None, overrides: list[str], data: str | None, out: str | None,
                   resume: bool | str, overwrite: bool, progress: bool = True) -> int:
    """``text2llm train``: resolve config, data and run dir, then :func:`train`.

    With ``--resume`` the run dir's saved config is the base (``key=value`` overrides still apply,
    e.g. a larger ``train.max_steps``) and the data dir recorded in ``RUN/run.json`` is the default;
    a run dir that holds no checkpoint yet starts again from step 0.
    Returns 0, or 130 / 143 when Ctrl-C / SIGTERM stopped the run (after saving a checkpoint).
    """
    run_dir = Path(resume if isinstance(resume, str) else (out or "runs/train"))
    if resume:
        saved = run_dir / "config.toml"
        if not saved.is_file():
            raise UserError(f"{run_dir}: nothing to resume (no config.toml); start a run without --resume")
        cfg = load_config(config or saved, overrides)
        if data is None:
            info = run_dir / "run.json"
            data = json.loads(info.read_text(encoding="utf-8"))["data"] if info.is_file() else None
    else:
        cfg = load_config(config, overrides)
    if data is None:
        raise UserError("train: --data TOKENS_DIR is required (token shards from `text2llm pack`)")
    result = train(cfg, data, run_dir, resume=bool(resume), overwrite=overwrite, progress=progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return 130 if result.interrupted == "SIGINT" else 143 if result.interrupted else 0
    if result.interrupted:
        print(f"stopped by {result.interrupted} at step {result.step}; checkpoint {result.last_checkpoint}\n"
              f"continue with: text2llm train --resume {run_dir}")
        return 130 if result.interrupted == "SIGINT" else 143
    vl = None if result.val_loss is None else round(result.val_loss, 4)
    bpb = None if result.val_bits_per_byte is None else round(result.val_bits_per_byte, 4)
    print(f"step {result.step}: val loss {vl}, bits/byte {bpb}, {result.train_tokens_per_s:,.0f} tokens/s "
          f"-> {result.last_checkpoint}")
    return 0
