"""The training loop behind ``text2llm train`` and ``text2llm.train``.

One optimizer step on each of ``world`` processes, with ``k`` micro-batches each::

    for each micro-batch i of k:   (no gradient sync until the last one)
        loss_i = sum of token cross-entropy / (target tokens of the whole global batch)  [+ MoE aux / k]
        backward(loss_i * world)     # DDP / FSDP average gradients over processes
    grad_norm = clip(global grad norm)          # logged every step it is logged
    skip the step if loss or grad_norm is non-finite (stop after train.max_bad_steps such steps)
    lr = schedule(step); AdamW step; zero grads

Data: the train stream is cut into ``world * k`` parts and micro-batch slot ``rank * k + i``
always reads part ``rank * k + i``. What a step sees depends only on the number of slots, so
1 process with ``grad_accum=2`` computes the same steps as 2 processes with ``grad_accum=1``,
and a run can resume on a different process count when ``world * k`` stays the same.

Every ``log_every`` steps a line goes to ``metrics.jsonl`` (and TensorBoard); every
``eval_every`` steps the val split is evaluated (loss, perplexity, bits-per-byte), samples are
appended to ``samples.txt`` and ``loss.png`` is redrawn; checkpoints are written every
``checkpoint_every`` steps, at the end, and on Ctrl-C / SIGTERM. ``resume=True`` restores model,
optimizer, loader and RNG state: on CPU the continued run computes bitwise the same losses as an
uninterrupted one.
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
import torch.nn.functional as F

from text2llm.checkpoint import best_checkpoint, load_weights, read_checkpoint_config, read_state, resolve_checkpoint
from text2llm.errors import UserError
from text2llm.train import checkpoint as ckpt_mod
from text2llm.train import distributed as D
from text2llm.train.distributed import pick_device  # noqa: F401  (re-exported: other stages import it from here)
from text2llm.train.optim import lr_at, make_optimizer

IGNORE_INDEX = -100


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None = plain fp32. On CPU bf16 is usually far slower (no bf16 matmul units), so auto = fp32."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def lm_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; targets equal to IGNORE_INDEX (padding) do not count."""
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), ignore_index=IGNORE_INDEX)


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
                     sync: Callable | None = None, scaler=None, attn_mask_fn: Callable | None = None) -> StepStats:
    """Accumulate the gradients of one optimizer step over ``batches`` [(x_BT, y_BT), ...].

    Default loss: the gradient of (sum of token cross-entropy over every micro-batch of every
    process) / ``denom``, the number of target tokens in the global batch, so padding and uneven
    micro-batches weigh each token the same (4 x micro-batch 2 == micro-batch 8). ``loss_fn(model,
    x, y) -> (loss, extras)`` replaces it (distillation); its losses are averaged over micro-batches.
    ``sync(is_last)`` returns a context that turns gradient sync off on all but the last micro-batch.
    """
    k = len(batches)
    if denom is None:
        denom = world_size * sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)
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
                    ce_sum = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
                    share = ce_sum / max(1.0, denom)
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


# ---- the loop ------------------------------------------------------------------------------------


def _memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except (ImportError, OSError):
        return float("nan")


def _prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, env: D.DistEnv) -> Path | None:
    """Checks (every rank, read-only), then rank 0 clears / creates the dir. Returns the checkpoint to resume."""
    start_ckpt = None
    if resume:
        start_ckpt = resolve_checkpoint(run_dir)
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise UserError(f"{run_dir}: run dir is not empty (use --resume to continue it, or --overwrite)")
    D.barrier(env)
    if env.is_main:
        if not resume and run_dir.exists() and overwrite:
            import shutil

            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
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

    ``cfg`` is a :class:`text2llm.config.Config`. ``loss_fn(model, x, y) -> (loss, extras)`` replaces
    the LM loss (distillation plugs in here); ``extras`` (numbers or 0-d tensors) are logged.
    ``init_from`` (or ``train.init_from``) starts from a checkpoint's weights with a fresh
    optimizer at step 0; the model shape is ``cfg.model`` as given. Under torchrun every process
    calls this; rank 0 alone writes logs and checkpoints. A script of your own that trains with
    ``train.distributed=fsdp`` should end with ``os._exit`` once its output is flushed, as the
    ``text2llm`` command does (why: ``text2llm.train.distributed.joined_process_group``).
    """
    from text2llm.pack import read_meta

    run_dir, data_dir = Path(run_dir), Path(data_dir)
    tc = cfg.train
    meta = read_meta(data_dir)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = meta["vocab_size"]
    elif cfg.model.vocab_size < meta["vocab_size"]:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} < the tokenizer's {meta['vocab_size']} ({data_dir})")
    if resume and init_from:
        raise UserError("train: --resume and init_from exclude each other (init_from starts a new run at step 0)")
    init_from = None if resume else (init_from or tc.init_from or None)  # a resumed run's weights come from its checkpoint
    threads_before = torch.get_num_threads()
    if tc.threads:
        torch.set_num_threads(tc.threads)

    env = D.init_distributed(tc)
    finished = False
    try:
        start_ckpt = _prepare_run_dir(run_dir, resume, overwrite, env)
        result = _train(cfg, meta, data_dir, run_dir, start_ckpt, env, progress, loss_fn, init_from)
        finished = True
        return result
    finally:
        D.shutdown(env, barrier=finished)
        torch.set_num_threads(threads_before)  # a library call leaves the caller's setting as it was


def _train(cfg, meta, data_dir, run_dir, start_ckpt, env, progress, loss_fn, init_from) -> TrainResult:
    from text2llm.evaluate import loader_nll
    from text2llm.loader import TokenLoader
    from text2llm.model.transformer import Transformer
    from text2llm.metrics import MetricsWriter, plot_curves, truncate_metrics
    from text2llm.train.mfu import device_peak_flops

    tc = cfg.train
    device = env.device
    amp_dtype = autocast_dtype(tc.precision, device)
    if amp_dtype is not None and device.type == "cpu" and env.is_main:
        print(f"warning: train.precision={tc.precision} on CPU: autocast to {amp_dtype} is usually much slower than fp32")
    k = tc.accum_steps(env.world_size)
    slots = env.world_size * k
    config_toml = cfg.to_toml()
    if env.is_main:
        (run_dir / "config.toml").write_text(config_toml, encoding="utf-8")
        (run_dir / "run.json").write_text(json.dumps({"data": str(data_dir.resolve())}) + "\n", encoding="utf-8")
    tokenizer_dir = Path(meta["tokenizer_dir"]) if Path(meta.get("tokenizer_dir", "")).is_dir() else None
    padded = meta.get("mode") == "padded"  # targets hold IGNORE_INDEX: count real target tokens per step

    # ---- model and optimizer (identical init on every rank; weights loaded before wrapping) ----
    torch.manual_seed(tc.seed)
    model = Transformer(cfg.model).to(device)
    if init_from is not None:
        src = resolve_checkpoint(init_from)
        if not (src / "model.safetensors").is_file():
            raise UserError(f"{src}: init_from needs a float checkpoint with model.safetensors")
        load_weights(model, src / "model.safetensors")
    if start_ckpt is not None:
        load_weights(model, start_ckpt / "model.safetensors")
    if env.rank:
        torch.manual_seed(tc.seed + env.rank)  # dropout differs between ranks
    params = model.num_params()
    flops_per_token = model.flops_per_token(tc.seq_len) if hasattr(model, "flops_per_token") else 6.0 * params
    fwd, parallel = D.wrap_model(model, env, compile=tc.compile)
    optimizer = make_optimizer(model, tc)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    sync = (lambda last: D.grad_sync(parallel, env, last)) if env.enabled else None

    # ---- data: micro-batch slot p = rank * k + i reads part p of `slots` parts of the stream ----
    loaders = [TokenLoader(data_dir, "train", tc.batch_size, tc.seq_len, "random", seed=tc.seed,
                           rank=env.rank * k + i, world_size=slots) for i in range(k)]
    attn_mask_fn = None
    if tc.document_mask:
        import text2llm.loader

        mask_fn = getattr(text2llm.loader, "document_attention_mask", None)
        if mask_fn is None:
            raise UserError("train.document_mask: this version of text2llm.loader has no document_attention_mask")
        bos = meta.get("bos_id")
        attn_mask_fn = lambda x: mask_fn(x, bos)  # noqa: E731
    val_loader, val_shared = None, False
    val_info = meta["splits"].get("val", {"tokens": 0, "bytes": 0})
    if val_info["tokens"] > tc.seq_len:
        val_shared = val_info["tokens"] // env.world_size <= tc.seq_len  # too small to split: every rank scores it all
        r, w = (0, 1) if val_shared else (env.rank, env.world_size)
        val_loader = TokenLoader(data_dir, "val", tc.batch_size, tc.seq_len, "sequential", rank=r, world_size=w)

    # ---- resume ----
    step, tokens_seen, bad_steps = 0, 0, 0
    if start_ckpt is not None:
        state = read_state(start_ckpt)
        saved_slots = state.get("loaders") or [state["loader"]]
        if len(saved_slots) != slots:
            raise UserError(
                f"{start_ckpt}: written with {len(saved_slots)} micro-batch slots per step (processes x grad_accum); "
                f"this run has {env.world_size} x {k} = {slots}. Resume with the same product (set train.tokens_per_step "
                f"to keep it fixed across process counts)")
        fmt = "fqn" if env.mode == "fsdp" else "torch"
        if state.get("optimizer_format", "torch") != fmt:
            raise UserError(f"{start_ckpt}: optimizer state was saved by a {state.get('distributed')} run; resume it "
                            f"with train.distributed={state.get('distributed')} (or start a new run with init_from)")
        D.load_optimizer_state(model, optimizer,
                               torch.load(start_ckpt / "optimizer.pt", weights_only=True, map_location=device), env)
        for i, loader in enumerate(loaders):
            loader.load_state_dict(saved_slots[env.rank * k + i])
        rngs = state.get("rng_ranks")
        ckpt_mod.set_rng_state(rngs[env.rank] if rngs and len(rngs) == env.world_size else state["rng"])
        if scaler is not None and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        step, tokens_seen, bad_steps = state["step"], state["tokens_seen"], state.get("bad_steps", 0)
        if env.is_main:
            truncate_metrics(run_dir / "metrics.jsonl", step)
            changed = _config_changes(start_ckpt, cfg)
            if changed:
                print(f"note: resuming {start_ckpt.name} with a changed config ({', '.join(changed[:6])}); "
                      f"the continued run is not the one the checkpoint started")

    log = MetricsWriter(run_dir, enabled=env.is_main, tensorboard=tc.tensorboard)
    peak, peak_src = (None, "")
    if env.is_main or device.type == "cuda":
        cache = Path(tc.peak_cache) if tc.peak_cache else run_dir / "peak_flops.json"
        peak, peak_src = device_peak_flops(device, tc.peak_flops, cache if env.is_main else None)
    tokens_per_step = tc.batch_size * tc.seq_len * k * env.world_size
    tokenizer = None
    if tokenizer_dir is not None and tc.samples and (env.is_main or env.mode == "fsdp"):
        from text2llm.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(tokenizer_dir)
    history: list[dict] = []

    def run_eval() -> dict:
        if val_loader is None:
            return {}
        nll, count = loader_nll(fwd, val_loader, tc.eval_batches, device, amp_dtype, None, attn_mask_fn)
        if not val_shared:
            both = D.all_reduce_sum(torch.stack([nll, count]), env)
            nll, count = both[0], both[1]
        loss = float(nll / count.clamp(min=1))
        bpb = loss / math.log(2) * val_info["tokens"] / max(1, val_info["bytes"])
        rec = {"step": step, "val_loss": loss, "val_perplexity": math.exp(min(loss, 50)), "val_bits_per_byte": bpb}
        log.write(rec)
        history.append(rec)
        return rec

    def write_samples() -> None:
        if tokenizer is None:
            return
        from text2llm.infer.generate import generate
        from text2llm.infer.packing import pack_weights

        model.eval()
        texts = []
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            for i in range(tc.samples):
                texts.append(generate(model, tokenizer, cfg.generate.prompt, tc.sample_tokens,
                                      cfg.generate.temperature, cfg.generate.top_k, cfg.generate.top_p,
                                      seed=cfg.generate.seed + i))
        pack_weights(model, on=False)  # the generation engine packed the weights: free that copy
        model.train()
        if env.is_main:
            with open(run_dir / "samples.txt", "a", encoding="utf-8") as f:
                for t in texts:
                    f.write(f"--- step {step} ---\n{t}\n\n")

    def save(val: dict) -> Path | None:
        loader_states = [s for per_rank in D.all_gather_objects([l.state_dict() for l in loaders], env) for s in per_rank]
        rngs = D.all_gather_objects(ckpt_mod.rng_state(), env)
        msd = D.full_model_state(model, env)
        osd = D.full_optimizer_state(model, optimizer, env)
        path = None
        if env.is_main:
            state = {"tokens_seen": tokens_seen, "loaders": loader_states, "rng": rngs[0], "rng_ranks": rngs,
                     "world_size": env.world_size, "grad_accum": k, "distributed": env.mode,
                     "optimizer_format": "fqn" if env.mode == "fsdp" else "torch", "bad_steps": bad_steps,
                     "config_hash": cfg.hash(), "tokenizer": "tokenizer" if tokenizer_dir else None,
                     "val_loss": val.get("val_loss") if val.get("step") == step else None,
                     "grad_scaler": scaler.state_dict() if scaler is not None else None}
            path = ckpt_mod.save_checkpoint(run_dir, step, msd, osd, state, config_toml, tokenizer_dir,
                                            keep_last=tc.keep_last, keep_best=tc.keep_best,
                                            tie_embeddings=cfg.model.tie_embeddings)
        path = D.broadcast_object(str(path) if path else None, env)
        return Path(path) if path else None

    def refresh_plot() -> None:
        if env.is_main and tc.plot:
            plot_curves(run_dir / "metrics.jsonl", run_dir / "loss.png")

    from tqdm import tqdm

    bar = tqdm(total=tc.max_steps, initial=step, desc="train", unit="step", disable=not (progress and env.is_main),
               mininterval=1.0, dynamic_ncols=True)
    say = tqdm.write if env.is_main else (lambda *_: None)
    last_eval: dict = {}
    last_ckpt = start_ckpt
    start_step = step
    t_start = time.perf_counter()
    t_log, tokens_at_log = t_start, tokens_seen
    train_seconds, train_tokens = 0.0, 0
    stop_flag = torch.zeros((), device=device)
    model.train()
    with GracefulStop() as stopper:
        while step < tc.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = []
            for loader in loaders:
                batches.append(next(loader))  # padded data: the loader sets padding targets to IGNORE_INDEX
            if padded:  # count target tokens of the whole global batch
                denom = float(D.all_reduce_sum(torch.tensor(float(sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)),
                                                            device=device), env))
            else:
                denom = float(tokens_per_step)
            stats = forward_backward(fwd, batches, device, amp_dtype, loss_fn, denom, env.world_size, sync, scaler,
                                     attn_mask_fn)
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = D.local_value(torch.nn.utils.clip_grad_norm_(
                model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf")))
            stop_flag.fill_(1.0 if stopper.signal else 0.0)
            shared = D.all_reduce_sum(torch.stack([stats.loss, stop_flag]), env)
            loss_val, stop_any, gnorm = torch.stack([shared[0], shared[1], grad_norm.float().to(device)]).tolist()
            if not math.isfinite(loss_val) or (scaler is None and not math.isfinite(gnorm)):
                bad_steps += 1
                optimizer.zero_grad(set_to_none=True)
                say(f"step {step + 1}: non-finite {'loss' if not math.isfinite(loss_val) else 'gradient'} "
                    f"(loss={loss_val}, grad_norm={gnorm}); step skipped, weights unchanged "
                    f"({bad_steps}/{tc.max_bad_steps} allowed)")
                if bad_steps >= tc.max_bad_steps:
                    bar.close()
                    log.close()
                    raise UserError(
                        f"train: stopped after {bad_steps} steps with a non-finite loss or gradient (train.max_bad_steps="
                        f"{tc.max_bad_steps}); lower train.lr or check the data. Last good checkpoint: {last_ckpt}")
                step += 1
                bar.update(1)
                continue
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            train_seconds += time.perf_counter() - t0
            train_tokens += tokens_per_step
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.max_steps or stop_any:
                now = time.perf_counter()
                tps = (tokens_seen - tokens_at_log) / max(1e-9, now - t_log)
                t_log, tokens_at_log = now, tokens_seen
                rec = {"step": step, "loss": loss_val, "lr": lr, "grad_norm": gnorm, "tokens_per_s": tps,
                       "tokens_seen": tokens_seen, "elapsed_s": now - t_start, "mem_mib": _memory_mib(device)}
                if peak:
                    rec["mfu"] = tps * flops_per_token / (peak * env.world_size)
                if stats.aux_loss is not None:
                    rec["aux_loss"] = float(D.all_reduce_sum(stats.aux_loss.clone(), env)) / env.world_size
                if stats.expert_load is not None:  # share of routed tokens per expert, per MoE layer
                    load = D.all_reduce_sum(stats.expert_load.clone(), env)
                    share = load / load.sum(-1, keepdim=True).clamp(min=1)
                    rec["expert_load"] = [[round(v, 4) for v in row] for row in share.reshape(-1, share.size(-1)).tolist()]
                    rec["expert_load_max_ratio"] = float(share.max() * share.size(-1))  # 1.0 = perfectly balanced
                for name, v in stats.extras.items():
                    rec[name] = float(v)
                log.write(rec)
                history.append(rec)
                bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
            if stop_any:
                say(f"step {step}: {stopper.signal or 'a signal on another rank'} received, saving a checkpoint")
                break
            if tc.time_budget_s and step == start_step + tc.budget_probe_steps:
                new_max = D.broadcast_object(_steps_within_budget(tc, step, time.perf_counter() - t_start,
                                                                  train_seconds / (step - start_step)), env)
                say(f"step {step}: train.time_budget_s={tc.time_budget_s:g} -> train.max_steps={new_max} "
                    f"(was {tc.max_steps})")
                tc.max_steps, tc.time_budget_s = new_max, 0.0  # decided once: the rest of the run is step-based
                config_toml = cfg.to_toml()
                if env.is_main:
                    (run_dir / "config.toml").write_text(config_toml, encoding="utf-8")
                bar.total = tc.max_steps
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
                last_eval = run_eval()
                if last_eval:
                    say(f"step {step}: val loss {last_eval['val_loss']:.4f}, bpb {last_eval['val_bits_per_byte']:.4f}")
                write_samples()
                refresh_plot()
            if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < tc.max_steps:
                last_ckpt = save(last_eval)
        bar.close()
        interrupted = stopper.signal or (None if step >= tc.max_steps else "signal")
        if interrupted:
            if step != start_step or last_ckpt is None:
                last_ckpt = save(last_eval)
        else:
            last_eval = run_eval()
            write_samples()
            if not (last_ckpt is not None and last_ckpt.name == f"step_{step:07d}" and step == start_step):
                last_ckpt = save(last_eval)
        refresh_plot()
    log.close()
    seconds = time.perf_counter() - t_start
    tps_all = train_tokens / max(1e-9, train_seconds)
    mfu = tps_all * flops_per_token / (peak * env.world_size) if peak else None
    result = TrainResult(
        run_dir=run_dir, step=step,
        val_loss=last_eval.get("val_loss"), val_bits_per_byte=last_eval.get("val_bits_per_byte"),
        train_tokens_per_s=tps_all, params=params, seconds=seconds, last_checkpoint=last_ckpt, history=history,
        best_checkpoint=best_checkpoint(run_dir) if env.is_main else None, mfu=mfu,
        interrupted=interrupted, skipped_steps=bad_steps,
    )
    if progress and env.is_main:
        _print_summary(result, env, k, peak, peak_src)
    return result


def _config_changes(ckpt: Path, cfg) -> list[str]:
    """``key: old -> new`` for every config value that differs from the checkpoint's."""
    try:
        saved = read_checkpoint_config(ckpt).to_dict()
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
    from text2llm.metrics import format_seconds, print_table

    rows = [("steps", f"{r.step:,}" + (f" (stopped by {r.interrupted})" if r.interrupted else "")),
            ("parameters", f"{r.params:,}"),
            ("processes x grad_accum", f"{env.world_size} x {k} ({env.mode})"),
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
    e.g. a larger ``train.max_steps``) and the data dir recorded in ``RUN/run.json`` is the default.
    Returns 0, or 130 / 143 when Ctrl-C / SIGTERM stopped the run (after saving a checkpoint).
    """
    from text2llm.config import load_config

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
