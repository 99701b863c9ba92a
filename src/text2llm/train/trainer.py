"""The training loop behind ``text2llm train``.

One optimizer step::

    for each of grad_accum micro-batches:   loss = CE(model(x), y) / grad_accum (+ MoE aux loss); backward
    clip the global grad norm; skip the step if anything is non-finite
    set the LR from the schedule; AdamW step; zero grads

Every ``log_every`` steps a line goes to ``metrics.jsonl``; every ``eval_every`` steps the val
split is evaluated (loss, perplexity, bits-per-byte); checkpoints are written every
``checkpoint_every`` steps and at the end. ``--resume`` restores model, optimizer, loader and RNG
state so that the continued run computes the same losses as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from text2llm.errors import UserError
from text2llm.train import checkpoint as ckpt_mod
from text2llm.train.optim import lr_at, make_optimizer

IGNORE_INDEX = -100


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


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
    history: list[dict] = field(default_factory=list)


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


@torch.no_grad()
def evaluate_loader(model, loader, n_batches: int, device, amp_dtype) -> float:
    """Mean CE over ``n_batches`` batches of a sequential loader (restarted from its beginning)."""
    model.eval()
    loader.pos, total, count = loader.lo, 0.0, 0
    n_batches = max(1, min(n_batches, loader.num_windows() // loader.B or 1))
    for _ in range(n_batches):
        x, y = (t.to(device) for t in next(loader))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x).logits
        n = (y != IGNORE_INDEX).sum().item()
        total += lm_loss(logits, y).item() * n
        count += n
    model.train()
    return total / max(1, count)


def train(cfg, data_dir: str | Path, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
          progress: bool = True, loss_fn: Callable | None = None) -> TrainResult:
    """Train ``cfg.model`` on the token shards in ``data_dir``; write the run into ``run_dir``.

    ``cfg`` is a :class:`text2llm.config.Config`. ``loss_fn(model, x, y) -> (loss, extras)`` replaces
    the LM loss (distillation plugs in here); by default it is next-token cross-entropy.
    """
    from text2llm.loader import TokenLoader
    from text2llm.model.transformer import Transformer
    from text2llm.pack import read_meta

    run_dir = Path(run_dir)
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    start_ckpt = None
    if resume:
        start_ckpt = ckpt_mod.resolve_checkpoint(run_dir)
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError(f"{run_dir}: run dir is not empty (use --resume to continue it, or --overwrite)")
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    tc = cfg.train
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = meta["vocab_size"]
    elif cfg.model.vocab_size < meta["vocab_size"]:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} < the tokenizer's {meta['vocab_size']} ({data_dir})")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = pick_device(tc.device)
    amp_dtype = autocast_dtype(tc.precision, device)
    torch.manual_seed(tc.seed)
    config_toml = cfg.to_toml()
    (run_dir / "config.toml").write_text(config_toml, encoding="utf-8")
    (run_dir / "run.json").write_text(json.dumps({"data": str(data_dir.resolve())}) + "\n", encoding="utf-8")
    tokenizer_dir = Path(meta["tokenizer_dir"]) if Path(meta["tokenizer_dir"]).is_dir() else None

    model = Transformer(cfg.model).to(device)
    optimizer = make_optimizer(model, tc)
    train_loader = TokenLoader(data_dir, "train", tc.batch_size, tc.seq_len, "random", seed=tc.seed)
    has_val = meta["splits"]["val"]["tokens"] > tc.seq_len
    val_loader = TokenLoader(data_dir, "val", tc.batch_size, tc.seq_len, "sequential") if has_val else None
    val_tokens_per_byte = (meta["splits"]["val"]["tokens"] / max(1, meta["splits"]["val"]["bytes"])) if has_val else None

    step, tokens_seen = 0, 0
    if start_ckpt is not None:
        ckpt_mod.load_weights(model, start_ckpt / "model.safetensors")
        optimizer.load_state_dict(torch.load(start_ckpt / "optimizer.pt", weights_only=True, map_location=device))
        state = json.loads((start_ckpt / "state.json").read_text(encoding="utf-8"))
        train_loader.load_state_dict(state["loader"])
        ckpt_mod.set_rng_state(state["rng"])
        step, tokens_seen = state["step"], state["tokens_seen"]

    compiled = torch.compile(model) if tc.compile else model
    log = MetricsLog(run_dir / "metrics.jsonl")
    params = model.num_params()
    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum

    def run_eval() -> dict:
        if val_loader is None:
            return {}
        loss = evaluate_loader(compiled, val_loader, tc.eval_batches, device, amp_dtype)
        rec = {"step": step, "val_loss": loss, "val_perplexity": math.exp(min(loss, 50)),
               "val_bits_per_byte": loss / math.log(2) * val_tokens_per_byte}
        log.write(rec)
        return rec

    from tqdm import tqdm

    bar = tqdm(total=tc.max_steps, initial=step, desc="train", unit="step", disable=not progress,
               mininterval=1.0, dynamic_ncols=True)
    last_eval: dict = {}
    last_ckpt = start_ckpt
    t_start = time.perf_counter()
    t_log, tokens_at_log = t_start, tokens_seen
    train_seconds, train_tokens = 0.0, 0
    bad_steps = 0
    model.train()
    while step < tc.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for _ in range(tc.grad_accum):
            x, y = (t.to(device, non_blocking=True) for t in next(train_loader))
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                if loss_fn is None:
                    out = compiled(x)
                    loss = lm_loss(out.logits, y)
                    if out.aux_loss is not None:
                        loss = loss + out.aux_loss
                else:
                    loss, _ = loss_fn(compiled, x, y)
            (loss / tc.grad_accum).backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        loss_avg = loss_sum / tc.grad_accum
        if not (math.isfinite(loss_avg) and torch.isfinite(grad_norm)):
            bad_steps += 1
            optimizer.zero_grad(set_to_none=True)
            tqdm.write(f"step {step}: non-finite loss or gradient (loss={loss_avg}, grad_norm={grad_norm.item()}); "
                       f"step skipped ({bad_steps}/{tc.max_bad_steps})")
            if bad_steps >= tc.max_bad_steps:
                raise UserError(f"training stopped: {bad_steps} steps with a non-finite loss or gradient "
                                f"(lower train.lr or check the data); the last good checkpoint is kept")
            step += 1
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        train_seconds += time.perf_counter() - t0
        train_tokens += tokens_per_step
        bar.update(1)
        if step % tc.log_every == 0 or step == tc.max_steps:
            now = time.perf_counter()
            tps = (tokens_seen - tokens_at_log) / max(1e-9, now - t_log)
            t_log, tokens_at_log = now, tokens_seen
            log.write({"step": step, "loss": loss_avg, "lr": lr, "grad_norm": grad_norm.item(),
                       "tokens_per_s": tps, "tokens_seen": tokens_seen, "elapsed_s": now - t_start})
            bar.set_postfix(loss=f"{loss_avg:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
        if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
            last_eval = run_eval()
            if last_eval:
                tqdm.write(f"step {step}: val loss {last_eval['val_loss']:.4f}, bpb {last_eval['val_bits_per_byte']:.4f}")
        if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < tc.max_steps:
            last_ckpt = _save(run_dir, step, model, optimizer, train_loader, tokens_seen, last_eval, cfg,
                              config_toml, tokenizer_dir)
    bar.close()
    last_eval = run_eval()
    last_ckpt = _save(run_dir, step, model, optimizer, train_loader, tokens_seen, last_eval, cfg, config_toml, tokenizer_dir)
    return TrainResult(
        run_dir=run_dir, step=step,
        val_loss=last_eval.get("val_loss"), val_bits_per_byte=last_eval.get("val_bits_per_byte"),
        train_tokens_per_s=train_tokens / max(1e-9, train_seconds), params=params,
        seconds=time.perf_counter() - t_start, last_checkpoint=last_ckpt,
    )


def _save(run_dir, step, model, optimizer, loader, tokens_seen, last_eval, cfg, config_toml, tokenizer_dir):
    state = {"tokens_seen": tokens_seen, "loader": loader.state_dict(), "config_hash": cfg.hash(),
             "val_loss": last_eval.get("val_loss") if last_eval.get("step") == step else None,
             "tokenizer": "tokenizer" if tokenizer_dir else None}
    return ckpt_mod.save_checkpoint(run_dir, step, model, optimizer, state, config_toml, tokenizer_dir,
                                    keep_last=cfg.train.keep_last)


def train_from_cli(config: str | None, overrides: list[str], data: str | None, out: str | None,
                   resume: bool | str, overwrite: bool, progress: bool = True) -> int:
    """``text2llm train``: resolve config, data and run dir, then :func:`train`."""
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
    print(f"step {result.step}: val loss {result.val_loss if result.val_loss is None else round(result.val_loss, 4)}, "
          f"bits/byte {result.val_bits_per_byte if result.val_bits_per_byte is None else round(result.val_bits_per_byte, 4)}, "
          f"{result.train_tokens_per_s:,.0f} tokens/s -> {result.last_checkpoint}")
    return 0
