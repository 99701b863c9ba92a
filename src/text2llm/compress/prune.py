"""Pruning: unstructured magnitude pruning, and structured pruning of attention heads or FFN channels.

- ``magnitude``: zero the smallest ``sparsity`` share of the weights of every block's Linear layers
  (attention q/k/v/o, MLP gate/up/down; embeddings and the head are kept), with one threshold over
  all of them (``scope="global"``) or one per matrix (``scope="layer"``). The tensors keep their
  shape: the result is smaller only once compressed or run by a sparse kernel.
- ``heads`` / ``ffn``: remove whole attention heads or MLP hidden channels, the least important
  first, the *same number in every layer*, so the result is a plain, smaller ``ModelConfig``
  (``n_head`` / ``n_kv_head`` / ``head_size``, or ``ffn_hidden``) that loads everywhere.

Importance (per head or channel, per layer) is first-order Taylor, ``sum |w * dL/dw|`` over the
weights the unit owns, accumulated over a few training batches when token shards are given
(Molchanov et al. 2019); without data it is the product of the L2 norms of the unit's weights.

GQA: with ``n_kv_head < n_head`` every K/V head keeps the same number of its query heads
(``n_head' = n_kv_head * g'``); with plain multi-head attention whole heads (q, k, v, o) go.

An optional short fine-tune runs through the normal training loop (``train(..., init_from=...)``);
for magnitude pruning the removed weights get zero gradients, so they stay exactly zero.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from text2llm.checkpoint import load_weights, save_weights, write_checkpoint_dir
from text2llm.compress.common import load_fp32, report_data
from text2llm.compress.report import LATENCY_KEYS, compare, measure, retime, write_report
from text2llm.errors import UserError
from text2llm.files import check_output_dir, staged_output
from text2llm.loader import TokenLoader
from text2llm.model.transformer import MLP, Transformer
from text2llm.loss import lm_loss
from text2llm.train.trainer import train

PRUNABLE = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# ---- unstructured ----------------------------------------------------------------------------------


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> weight of every Linear in the blocks (the matrices magnitude pruning may zero)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith("blocks.") and name.split(".", 2)[-1] in PRUNABLE:
            out[f"{name}.weight"] = mod.weight
    if not out:
        raise UserError("prune: the model has no prunable Linear layers in its blocks")
    return out


@torch.no_grad()
def magnitude_masks(model: nn.Module, sparsity: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """Boolean keep-masks zeroing the ``sparsity`` share of smallest-|w| weights."""
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"--sparsity: {sparsity} must be in [0, 1)")
    weights = prunable_weights(model)
    masks = {}
    if scope == "global":
        scores = torch.cat([w.abs().flatten() for w in weights.values()])
        k = int(round(sparsity * scores.numel()))
        threshold = torch.kthvalue(scores, k).values if k > 0 else scores.new_tensor(-1.0)
        for name, w in weights.items():
            masks[name] = w.abs() > threshold
    elif scope == "layer":
        for name, w in weights.items():
            k = int(round(sparsity * w.numel()))
            threshold = torch.kthvalue(w.abs().flatten(), k).values if k > 0 else w.new_tensor(-1.0)
            masks[name] = w.abs() > threshold
    else:
        raise UserError(f"--scope: {scope!r} must be 'global' or 'layer'")
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask)


def sparsity_of(model: nn.Module) -> float:
    """Share of exact zeros among the prunable weights."""
    ws = prunable_weights(model).values()
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


class MaskedLoss:
    """A ``loss_fn`` for the trainer that keeps pruned weights at zero during a fine-tune:
    it registers (once) gradient hooks that zero the gradients of the masked weights, then
    computes the normal LM loss. With zero gradients AdamW never moves a zero weight."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks, self.hooked = masks, False

    def __call__(self, model, x, y):
        if not self.hooked:
            params = {n.replace("_orig_mod.", "").replace("module.", ""): p for n, p in model.named_parameters()}
            for name, mask in self.masks.items():
                m = mask.to(params[name].device, params[name].dtype)
                params[name].register_hook(lambda g, m=m: g * m)
            self.hooked = True
        out = model(x)
        loss = lm_loss(out.logits, y)
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        return loss, {}


# ---- importance --------------------------------------------------------------------------------------


def taylor_grads(model: nn.Module, data: Path, batches: int = 4, batch_size: int = 8, seq_len: int | None = None,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """Accumulated |w * grad| of every parameter over a few training batches."""
    seq_len = min(seq_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
    loader = TokenLoader(data, "train", batch_size, seq_len, "random", seed=seed)
    seq_len = loader.T
    model.train()
    scores = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for _ in range(batches):
        x, y = next(loader)
        model.zero_grad(set_to_none=True)
        lm_loss(model(x).logits, y).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                scores[n] += (p.detach() * p.grad).abs()
    model.zero_grad(set_to_none=True)
    model.eval()
    return scores


def _unit_scores(score: dict[str, torch.Tensor] | None, params: dict[str, torch.Tensor], rows: list[str],
                 cols: list[str], unit: int, n: int) -> torch.Tensor:
    """(n,) importance of n units of width ``unit`` that own rows of the ``rows`` matrices and
    columns of the ``cols`` matrices. Taylor: the sum of |w * grad| over the unit's weights.
    Without gradients: the product of the unit's L2 norms in each matrix (zero if any part is zero,
    e.g. a channel whose down_proj column is zero contributes nothing)."""

    def per_unit(t: torch.Tensor, key: str) -> torch.Tensor:
        return (t.reshape(n, unit, -1).sum(dim=(1, 2)) if key in rows
                else t.reshape(t.size(0), n, unit).sum(dim=(0, 2)))

    if score is not None:
        return sum(per_unit(score[k], k) for k in rows + cols)
    total = torch.ones(n)
    for k in rows + cols:
        total *= per_unit(params[k].detach().pow(2), k).sqrt()
    return total


# ---- structured --------------------------------------------------------------------------------------


def _check_dense(model: nn.Module) -> None:
    cfg = model.cfg
    if getattr(cfg, "n_experts", 0) or not all(isinstance(b.mlp, MLP) for b in model.blocks):
        raise UserError("prune --method heads/ffn: Mixture-of-Experts models are not supported by structured pruning "
                        "(prune a dense model, or use --method magnitude)")


def _take(t: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    return t.index_select(dim, idx).contiguous()


def _expand(idx_units: torch.Tensor, width: int) -> torch.Tensor:
    """Unit indices -> element indices (unit i covers width*i ... width*i + width - 1)."""
    return (idx_units[:, None] * width + torch.arange(width)[None, :]).flatten()


def prune_ffn(model: nn.Module, sparsity: float, scores: dict[str, torch.Tensor] | None = None,
              multiple_of: int = 8) -> tuple[nn.Module, dict]:
    """A new, smaller model with ``ffn_hidden`` reduced by ``sparsity`` in every layer."""
    _check_dense(model)
    cfg = model.cfg
    F_ = cfg.ffn_dim
    keep = F_ - int(round(sparsity * F_))
    if F_ >= 4 * multiple_of:
        keep = max(multiple_of, multiple_of * round(keep / multiple_of))
    keep = max(1, min(F_, keep))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    kept = []
    for i in range(cfg.n_layer):
        p = f"blocks.{i}.mlp."
        rows = [p + "up_proj.weight"] + ([p + "gate_proj.weight"] if cfg.activation == "swiglu" else [])
        s = _unit_scores(scores, sd, rows, [p + "down_proj.weight"], 1, F_)
        idx = torch.topk(s, keep).indices.sort().values
        kept.append(idx.tolist())
        for key in rows + [k.replace("weight", "bias") for k in rows if cfg.bias]:
            sd[key] = _take(sd[key], idx, 0)
        sd[p + "down_proj.weight"] = _take(sd[p + "down_proj.weight"], idx, 1)
    new_cfg = cfg.model_copy(update={"ffn_hidden": keep})
    new = Transformer(type(cfg).model_validate(new_cfg.model_dump()))
    _load_exact(new, sd)
    return new.eval(), {"ffn_hidden": [F_, keep], "kept_channels": kept}


def head_plan(n_head: int, n_kv: int, sparsity: float) -> tuple[int, int]:
    """(n_head', n_kv') after removing ``sparsity`` of the query heads, consistent with GQA groups."""
    if n_kv == n_head:  # multi-head: remove whole heads (q, k, v, o)
        h = max(1, n_head - int(round(sparsity * n_head)))
        return h, h
    g = n_head // n_kv
    g_new = max(1, g - int(round(sparsity * g)))  # same number of query heads kept in every K/V group
    return n_kv * g_new, n_kv


def prune_heads(model: nn.Module, sparsity: float, scores: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, dict]:
    """A new, smaller model with fewer attention heads (the same count in every layer)."""
    _check_dense(model)
    cfg = model.cfg
    H, K, Dh = cfg.n_head, cfg.kv_heads, cfg.head_dim
    H2, K2 = head_plan(H, K, sparsity)
    if H2 == H:
        raise UserError(f"prune --method heads: --sparsity {sparsity} removes no head of {H} "
                        f"({'groups of ' + str(H // K) + ' query heads per K/V head' if K < H else 'heads'}); raise it")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    kept = []
    for i in range(cfg.n_layer):
        p = f"blocks.{i}.attn."
        q_rows, o_cols = [p + "q_proj.weight"], [p + "o_proj.weight"]
        s_q = _unit_scores(scores, sd, q_rows, o_cols, Dh, H)
        if K == H:
            s = _unit_scores(scores, sd, q_rows + [p + "k_proj.weight", p + "v_proj.weight"], o_cols, Dh, H)
            q_idx = torch.topk(s, H2).indices.sort().values
            kv_idx = q_idx
        else:  # keep the best H2/K query heads inside each group; K/V heads stay
            g, g2 = H // K, H2 // K
            per_group = s_q.view(K, g)
            local = torch.topk(per_group, g2, dim=1).indices.sort(dim=1).values  # K g2
            q_idx = (local + torch.arange(K)[:, None] * g).flatten()
            kv_idx = torch.arange(K)
        kept.append(q_idx.tolist())
        q_el, kv_el = _expand(q_idx, Dh), _expand(kv_idx, Dh)
        for proj, idx in (("q_proj", q_el), ("k_proj", kv_el), ("v_proj", kv_el)):
            sd[p + proj + ".weight"] = _take(sd[p + proj + ".weight"], idx, 0)
            if cfg.bias:
                sd[p + proj + ".bias"] = _take(sd[p + proj + ".bias"], idx, 0)
        sd[p + "o_proj.weight"] = _take(sd[p + "o_proj.weight"], q_el, 1)
    update = {"n_head": H2, "n_kv_head": 0 if K2 == H2 else K2,
              "head_size": 0 if cfg.d_model % H2 == 0 and cfg.d_model // H2 == Dh else Dh}
    new_cfg = type(cfg).model_validate({**cfg.model_dump(), **update})
    new = Transformer(new_cfg)
    _load_exact(new, sd)
    return new.eval(), {"n_head": [H, H2], "n_kv_head": [K, K2], "head_dim": Dh, "kept_heads": kept}


def _load_exact(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed = {"lm_head.weight"} if model.cfg.tie_embeddings else set()
    if set(missing) - allowed or unexpected:  # a bug in the slicing above, not a user error
        raise RuntimeError(f"pruned weights do not fit the pruned config: missing {missing}, unexpected {unexpected}")


def removed_params(cfg_before, cfg_after) -> int:
    """Parameters that structured pruning removes, computed from the two configs alone."""
    D, b = cfg_before.d_model, int(cfg_before.bias)
    attn = lambda c: (c.n_head * c.head_dim) * (2 * D + b) + c.kv_heads * c.head_dim * 2 * (D + b)  # noqa: E731
    n_in = 2 if cfg_before.activation == "swiglu" else 1
    mlp = lambda c: c.ffn_dim * (n_in * (D + b) + D)  # noqa: E731
    return cfg_before.n_layer * (attn(cfg_before) - attn(cfg_after) + mlp(cfg_before) - mlp(cfg_after))


# ---- the command -------------------------------------------------------------------------------------


def prune_model(model: nn.Module, method: str, sparsity: float, scope: str = "global",
                data: Path | None = None) -> tuple[nn.Module, dict]:
    """Prune a float model; returns (pruned model, info). ``model`` itself is changed only by magnitude pruning."""
    if method == "magnitude":
        masks = magnitude_masks(model, sparsity, scope)
        apply_masks(model, masks)
        return model, {"masks": masks, "sparsity": sparsity_of(model), "scope": scope}
    if not 0.0 < sparsity < 1.0:
        raise UserError(f"--sparsity: {sparsity} must be in (0, 1) for structured pruning")
    scores = taylor_grads(model, data) if data is not None else None
    importance = "taylor (|w * grad| over 4 training batches)" if scores else "weight norm (no --data)"
    if method == "ffn":
        new, info = prune_ffn(model, sparsity, scores)
    elif method == "heads":
        new, info = prune_heads(model, sparsity, scores)
    else:
        raise UserError(f"--method: {method!r} must be magnitude, heads or ffn")
    info["importance"] = importance
    info["params_removed"] = removed_params(model.cfg, new.cfg)
    return new, info


def finetune(cfg, ckpt: Path, data: Path, run_dir: Path, steps: int, lr: float | None = None,
             loss_fn=None, progress: bool = True):
    """A short fine-tune of ``ckpt`` (a plain checkpoint dir) through the normal training loop."""
    tc = cfg.train
    lr = lr if lr is not None else tc.lr * 0.3
    overrides = {"max_steps": steps, "lr": lr, "min_lr": min(tc.min_lr, lr), "warmup_steps": min(tc.warmup_steps, steps // 10),
                 "eval_every": 0, "checkpoint_every": 0, "keep_last": 1, "init_from": ""}
    ft_cfg = cfg.model_copy(update={"train": tc.model_copy(update=overrides)})
    ft_cfg = type(cfg).model_validate(ft_cfg.model_dump())
    return train(ft_cfg, data, run_dir, overwrite=True, progress=progress, loss_fn=loss_fn, init_from=ckpt)


def prune_checkpoint(ckpt: str | Path, out: str | Path, method: str = "magnitude", sparsity: float = 0.3,
                     scope: str = "global", finetune_steps: int = 0, data: str | Path | None = None,
                     overwrite: bool = False, lr: float | None = None, report: bool = True,
                     latency_kwargs: dict | None = None, progress: bool = True) -> dict:
    """``text2llm compress prune``: checkpoint -> pruned plain checkpoint dir (+ fine-tune) + report.json."""
    check_output_dir(out, overwrite)
    src = load_fp32(ckpt)
    data = report_data(src.ckpt, data)
    if finetune_steps and data is None:
        raise UserError("prune --finetune-steps: needs token shards (--data TOKENS_DIR)")
    with staged_output(out, overwrite) as tmp:
        rep = _prune_into(tmp, Path(out), src, data, method, sparsity, scope, finetune_steps, lr, report,
                          latency_kwargs, progress)
    return rep


def _prune_into(tmp: Path, out: Path, src, data, method, sparsity, scope, finetune_steps, lr, report, latency_kwargs,
                progress) -> dict:
    """The work of :func:`prune_checkpoint`, written into the staging dir ``tmp`` that becomes ``out``."""
    before = measure(src.model, src.ckpt, data, timing=False) if report else {}
    model, info = prune_model(src.fresh_model(), method, sparsity, scope, data)
    masks = info.pop("masks", None)
    cfg = src.cfg.model_copy(update={"model": model.cfg})
    state = {"step": 0, "source": str(src.ckpt), "pruning": {"method": method, "requested_sparsity": sparsity, **info}}
    write_checkpoint_dir(tmp, model, cfg, src.tokenizer_dir, state)
    rows = {"before": before}
    if finetune_steps:
        if report:
            rows["pruned"] = measure(model, tmp, data, timing=False)
        run_dir = tmp / "finetune"
        res = finetune(cfg, tmp, data, run_dir, finetune_steps, lr, MaskedLoss(masks) if masks else None, progress)
        load_weights(model, res.last_checkpoint / "model.safetensors")
        if masks:
            apply_masks(model, masks)  # already exact (zero gradients keep zeros); a cheap guarantee
        state["finetune"] = {"steps": res.step, "run_dir": str(out / "finetune"),
                             "lr": lr if lr is not None else cfg.train.lr * 0.3}
        save_weights(model, tmp / "model.safetensors", {"step": res.step})
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the result is OUT itself; keep metrics.jsonl
    if method == "magnitude":
        state["pruning"]["sparsity"] = sparsity_of(model)
    rep = {}
    if report:
        rows["after"] = measure(model, tmp, data, timing=False)
        retime([before, rows["after"]], [src.model, model], latency_kwargs)
        if "pruned" in rows:  # same shapes as the fine-tuned model: same speed
            rows["pruned"].update({k: rows["after"][k] for k in LATENCY_KEYS})
        rep = compare(rows)
    rep.update(method=f"prune-{method}", settings={k: v for k, v in state["pruning"].items()
                                                    if k not in ("kept_channels", "kept_heads")} |
               {"finetune_steps": finetune_steps, "source": str(src.ckpt), "data": str(data) if data else None})
    if report:
        write_report(rep, tmp, f"pruning ({method}, sparsity {sparsity}): {src.ckpt} -> {out}", final_dir=out)
    return rep

