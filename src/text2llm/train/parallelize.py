"""Tensor and pipeline parallelism, applied to the single-device model from outside (torchtitan's
``parallelize.py`` and ``pipeline_parallel.py``), composed with DDP / FSDP2 on one device mesh.

The mesh (:func:`text2llm.train.distributed.init_distributed`) has named dims ``("pp", "dp", "tp")``::

    world = pp * dp * tp          e.g. 8 processes, train.pp=2 train.tp=2 -> dp = 2
    rank  = (pp_rank * dp + dp_rank) * tp + tp_rank

Order (torchtitan's): tensor parallel first (:func:`tp_plan`), then the pipeline cut
(:func:`cut_stages`), then the data-parallel wrapper (FSDP2 ``fully_shard`` per block and per stage
root, or DDP) over the ``dp`` dim. Everything goes through PyTorch's own APIs: DTensor
``parallelize_module``, ``torch.distributed.pipelining`` (stages and schedules), ``fully_shard``
and ``torch.distributed.checkpoint`` (each process saves and loads its own shards:
:func:`text2llm.train.checkpoint.save_sharded_checkpoint`); the only collective written here is
the pipeline's share of the gradient norm (one all-reduce of a scalar over ``pp``).

Tensor parallel (Megatron-LM's split, torchtitan's ``apply_tp``): see the table in
:func:`tp_plan`. Column-wise q/k/v and gate/up split heads and hidden units, row-wise o/down sum
the partial outputs, so each block costs one all-gather + one reduce-scatter per sublayer with
sequence parallelism (one all-reduce without). A process holds ``n_head / tp`` query heads and
``n_kv_head / tp`` key/value heads (GQA: each KV head stays with the query heads that use it).
The token embedding and the head are vocab-parallel; with ``train.loss_parallel`` the
cross-entropy runs on the vocab-sharded logits (``loss_parallel``), so full logits never exist.
MoE layers: every process holds every expert, and each expert's MLP is split like the dense
MLP; the router is replicated. Expert parallelism (experts placed on different processes) needs
all-to-all, which gloo lacks, so it is not offered.

Pipeline parallel: the blocks are cut into ``pp * stages_per_rank`` stages (an even split, or
``train.pp_split``); a stage is a :class:`StageModule` holding its blocks (plus the embedding on
the first stage, the final norm and head on the last) under the full model's parameter names, so
state dicts stay those of one process. Process ``pp_rank`` holds stages ``pp_rank, pp_rank + pp,
...`` ("loop" placement, which interleaved 1F1B needs). The ``k = grad_accum`` micro-batches of a
step are the schedule's micro-batches; its loss is the same sum of token losses over the global
batch as without a pipeline, so the losses equal one process's.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.distributed as tdist
import torch.nn as nn

from text2llm.errors import UserError
from text2llm.evaluate import loader_nll, val_batches
from text2llm.loss import IGNORE_INDEX, count_targets, token_nll_sum
from text2llm.model.transformer import Transformer
from text2llm.train import distributed as D

# torch.distributed.tensor, .tensor.parallel, .checkpoint and .pipelining are imported inside the
# functions that use them: they are slow to import, and a run on one process never needs them.


# ---- the layout, checked before anything is built ---------------------------------------------------------


def stages_per_rank(tc) -> int:
    return tc.pp_stages_per_rank or (2 if tc.pp_schedule == "interleaved-1f1b" else 1)


def check_layout(mc, tc, env, k: int) -> None:
    """One clear line for a layout the model or the batch cannot take (``mc`` ModelConfig, ``tc``
    TrainConfig, ``k`` micro-batches per step). The process count itself is checked when the mesh
    is built."""
    tp, pp = tc.tp, tc.pp
    check_tp(mc, tp)
    if tp > 1 and mc.qk_norm:
        raise UserError(f"train.tp={tp} with model.qk_norm=true is not supported (the per-head norm is not in the "
                        "tensor-parallel plan); use data parallelism (ddp / fsdp)")
    if tp > 1:
        if tc.sequence_parallel and tc.seq_len % tp:
            raise UserError(f"train.tp={tp} does not divide train.seq_len={tc.seq_len} (sequence parallel shards "
                            f"the sequence; or set train.sequence_parallel=false)")
        if tc.sequence_parallel and mc.positions == "learned" and mc.max_seq_len % tp:
            raise UserError(f"train.tp={tp} does not divide model.max_seq_len={mc.max_seq_len} (the learned "
                            f"position table is sharded with the sequence)")
    if tc.pp_split and pp == 1:
        raise UserError("train.pp_split is set but train.pp = 1")
    if pp > 1:
        v = stages_per_rank(tc)
        n_stages = pp * v
        if tc.pp_schedule == "interleaved-1f1b" and v < 2:
            raise UserError("train.pp_schedule=interleaved-1f1b needs train.pp_stages_per_rank >= 2")
        if tc.pp_schedule != "interleaved-1f1b" and v > 1:
            raise UserError(f"train.pp_schedule={tc.pp_schedule} runs one stage per process; "
                            f"train.pp_stages_per_rank={v} needs interleaved-1f1b")
        split_layers(mc.n_layer, n_stages, tc.pp_split)
        if tc.pp_schedule in ("1f1b", "interleaved-1f1b") and k < pp:
            raise UserError(f"train.pp_schedule={tc.pp_schedule} needs at least train.pp={pp} micro-batches per step; "
                            f"set train.grad_accum >= {pp} (or use gpipe)")
        if tc.pp_schedule == "interleaved-1f1b" and k % max(1, k // pp):
            raise UserError(f"train.pp_schedule=interleaved-1f1b needs train.grad_accum ({k}) to be a multiple of "
                            f"{max(1, k // pp)} (grad_accum // pp)")
    if env.model_parallel:
        if tc.precision == "fp16":
            raise UserError("train.tp / train.pp with train.precision=fp16 is not supported (no grad scaler across "
                            "stages); use bf16 or fp32")


def check_tp(mc, tp: int, what_tp: str = "train.tp") -> None:
    """A one-line error when ``tp`` does not divide the heads, KV heads, hidden sizes or vocab of ``mc``."""
    if tp == 1:
        return
    for what, n in (("model.n_head", mc.n_head), ("model.n_kv_head (key/value heads)", mc.kv_heads),
                    ("the MLP hidden size (model.ffn_hidden)", mc.ffn_dim), ("model.vocab_size", mc.vocab_size)):
        if n % tp:
            hint = f"; set model.vocab_size to a multiple of {tp} (>= {n})" if what == "model.vocab_size" else ""
            raise UserError(f"{what_tp}={tp} does not divide {what} = {n}{hint}")
    if mc.n_experts and mc.moe_dim % tp:
        raise UserError(f"{what_tp}={tp} does not divide the expert hidden size (model.moe_ffn_hidden) = {mc.moe_dim}")


def split_layers(n_layer: int, n_stages: int, split: list[int]) -> list[range]:
    """The blocks of each pipeline stage: ``split`` (layers per stage) or an even split."""
    if split:
        if len(split) != n_stages or sum(split) != n_layer or min(split) < 1:
            raise UserError(f"train.pp_split={split} must give {n_stages} stages (pp x stages per process) of >= 1 "
                            f"layer summing to model.n_layer={n_layer}")
        sizes = split
    else:
        if n_layer % n_stages:
            raise UserError(f"model.n_layer={n_layer} does not split evenly into {n_stages} pipeline stages; set "
                            f"train.pp_split (layers per stage)")
        sizes = [n_layer // n_stages] * n_stages
    starts = [sum(sizes[:i]) for i in range(n_stages)]
    return [range(a, a + n) for a, n in zip(starts, sizes)]


# ---- tensor parallel ------------------------------------------------------------------------------------


def tp_plan(model: nn.Module, sequence_parallel: bool = True, loss_parallel: bool = True) -> dict:
    """Module name -> how it is split over the ``tp`` dim (DTensor ``ParallelStyle``)::

        module                      style                       weight shard        output
        embed                       Rowwise (vocab-parallel)    vocab rows          seq shards (SP) | full
        pos_embed (learned)         Rowwise                     position rows       seq shards (SP) | full
        blocks.i.attn_norm          SequenceParallel (SP only)  replicated          seq shards
        blocks.i.attn               PrepareModuleInput          -                   gathers the sequence
        blocks.i.attn.q_proj/k/v    Colwise                     heads (H/tp, K/tp)  local heads
        blocks.i.attn.o_proj        Rowwise                     heads               reduce-scatter (SP) | all-reduce
        blocks.i.mlp_norm           SequenceParallel (SP only)  replicated          seq shards
        blocks.i.mlp.gate/up_proj   Colwise                     hidden units        local hidden units
        blocks.i.mlp.down_proj      Rowwise                     hidden units        reduce-scatter (SP) | all-reduce
        blocks.i.mlp (MoE)          Prepare input / output      router replicated   every expert split as the MLP
        norm                        SequenceParallel (SP only)  replicated          seq shards
        lm_head                     Colwise (vocab-parallel)    vocab rows          vocab shards (loss parallel) | full

    ``sequence_parallel`` (training) shards the activations that are not split otherwise (norms,
    residual stream) along the sequence; without it (decoding one token at a time) they are
    replicated. ``loss_parallel`` leaves the logits split by vocab for :func:`vocab_parallel_nll`.
    Only modules the model (or a pipeline stage's part of it) holds are in the plan.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel)

    seq = Shard(1) if sequence_parallel else Replicate()
    plan: dict = {}
    if getattr(model, "embed", None) is not None:
        plan["embed"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if getattr(model, "pos_embed", None) is not None:  # (T, D) table rows: the sequence is dim 0 of its output
        plan["pos_embed"] = RowwiseParallel(input_layouts=Replicate(),
                                            output_layouts=Shard(0) if sequence_parallel else Replicate())
    for name, block in _blocks(model):
        b = f"blocks.{name}"
        if sequence_parallel:
            plan[f"{b}.attn_norm"] = SequenceParallel()
            plan[f"{b}.mlp_norm"] = SequenceParallel()
            # (x, rope, cache, attn_mask): only x is a sequence-sharded activation
            plan[f"{b}.attn"] = PrepareModuleInput(input_layouts=(seq, None, None, None),
                                                   desired_input_layouts=(Replicate(), None, None, None))
        for proj in ("q_proj", "k_proj", "v_proj"):
            plan[f"{b}.attn.{proj}"] = ColwiseParallel()
        plan[f"{b}.attn.o_proj"] = RowwiseParallel(output_layouts=seq)
        if block.is_moe:
            plan.update(_moe_plan(f"{b}.mlp", block.mlp, sequence_parallel))
        else:
            if sequence_parallel:
                plan[f"{b}.mlp"] = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),))
            plan.update(_mlp_plan(f"{b}.mlp", block.mlp, output=seq))
    if getattr(model, "norm", None) is not None and sequence_parallel:
        plan["norm"] = SequenceParallel()
    if getattr(model, "lm_head", None) is not None:
        plan["lm_head"] = ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1) if loss_parallel else Replicate())
    return plan


def _mlp_plan(prefix: str, mlp: nn.Module, output) -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {f"{prefix}.up_proj": ColwiseParallel(), f"{prefix}.down_proj": RowwiseParallel(output_layouts=output)}
    if mlp.swiglu:
        plan[f"{prefix}.gate_proj"] = ColwiseParallel()
    return plan


def _moe_plan(prefix: str, moe: nn.Module, sequence_parallel: bool) -> dict:
    """Experts replicated on every process, each expert's MLP split like the dense MLP, with its
    output summed (all-reduce) before the router's weights multiply it: the routing math after
    the experts then sees full values, so the router's gradient is exact (a reduce over the
    weighted partial outputs would count the load-balancing term's gradient tp times)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInputOutput

    plan = {}
    if sequence_parallel:  # in: the whole sequence, as a plain tensor for the router; out: (y, RouterStats)
        plan[prefix] = PrepareModuleInputOutput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
            output_layouts=(Replicate(), None), desired_output_layouts=(Shard(1), None), use_local_output=True)
    for e in range(len(moe.experts)):
        plan.update(_mlp_plan(f"{prefix}.experts.{e}", moe.experts[e], output=Replicate()))
    return plan


def _blocks(model: nn.Module):
    blocks = model.blocks
    return blocks.items() if isinstance(blocks, nn.ModuleDict) else enumerate(blocks)


def apply_tp(model: nn.Module, tp_mesh, sequence_parallel: bool = True, loss_parallel: bool = True) -> nn.Module:
    """Split ``model`` (a Transformer, or a pipeline part of one) over ``tp_mesh`` in place.
    A tied head is tied again afterwards: both styles shard the shared (V, D) weight by rows."""
    from torch.distributed.tensor.parallel import parallelize_module

    tied = (getattr(model, "lm_head", None) is not None and getattr(model, "embed", None) is not None
            and model.lm_head.weight is model.embed.weight)
    parallelize_module(model, tp_mesh, tp_plan(model, sequence_parallel, loss_parallel))
    if tied:
        model.lm_head.weight = model.embed.weight
    return model


def register_grad_hooks(model: nn.Module) -> None:
    """For training under tp without FSDP2: :func:`_shard_grad_like_param` on every DTensor
    parameter (once the parameters are allocated: a meta-device model gets new tensors then)."""
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        if isinstance(p, DTensor) and p.requires_grad:
            p.register_post_accumulate_grad_hook(_shard_grad_like_param)


def _shard_grad_like_param(p) -> None:
    """The vocab-parallel embedding's backward returns a replicated (full-size) gradient for its
    sharded weight: keep only this process's rows (a local slice, no communication). Partial
    gradients (the replicated norms' under sequence parallelism) stay as they are: reducing them
    here would cost one all-reduce per micro-batch instead of one per step."""
    g = p.grad
    if g is not None and g.placements != p.placements and not any(pl.is_partial() for pl in g.placements):
        p.grad = g.redistribute(g.device_mesh, p.placements)


def vocab_parallel_nll(tp_mesh):
    """``token_nll_sum`` over logits split by vocab (B, T, V/tp on each process), without
    gathering them; call it, and backward, inside :meth:`ParallelModel.context`."""
    from torch.distributed.tensor import DTensor, Shard

    def nll(logits_local, targets_BT):
        logits = DTensor.from_local(logits_local, tp_mesh, [Shard(2)], run_check=False)
        return token_nll_sum(logits, targets_BT).to_local()

    return nll


def shard_for_inference(model: Transformer, tp: int) -> tuple[Transformer, int]:
    """``(model split over tp processes, key/value heads each holds)`` for generation under
    ``torchrun --nproc-per-node tp``: the plan of :func:`tp_plan` without sequence parallelism
    (a decode step has one position) and with full logits on every process, so every process
    samples the same token. The KV cache then holds ``n_kv_head / tp`` heads per process."""
    import os

    from torch.distributed.device_mesh import init_device_mesh

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp:
        raise UserError(f"--tp {tp} runs under `torchrun --nproc-per-node {tp} -m text2llm ...` "
                        f"(this is {world} process{'es' if world > 1 else ''})")
    check_tp(model.cfg, tp, "--tp")
    device = D.join_process_group("auto", int(os.environ.get("LOCAL_RANK", "0")))
    mesh = init_device_mesh(device.type, (tp,), mesh_dim_names=("tp",))
    apply_tp(model.to(device), mesh, sequence_parallel=False, loss_parallel=False)
    return model, model.cfg.kv_heads // tp


# ---- compile ----------------------------------------------------------------------------------------------


def compile_blocks(model: nn.Module, tp: int = 1) -> None:
    """``train.compile`` under tp / pp: each block's sublayers compiled in place (parameter
    names and state dicts unchanged), after the tensor-parallel split and before the data-parallel
    wrapper: torchtitan's order. The blocks share compiled programs (same code, same shapes), so
    the compile cost is about one block's.

    torchtitan compiles whole blocks. On torch 2.13 (CPU, gloo) that, and anything that puts the
    tensor-parallel plan's module hooks inside a compiled region, goes wrong under DTensor: a whole
    compiled block fails in backward, compiled norms train to losses 1e-4 away from one process's
    (sequence parallel: they fail), and a compiled attention whose input all-gather hook is in the
    region drifts by 1e-3 in 8 steps. Compiling only the ``forward`` of the attention and of the
    MLP / MoE (their hooks, i.e. the sequence-parallel gathers, stay eager) matches one process
    within 1e-6 (tests/test_parallel.py). So under tp that is what is compiled, and the norms and
    residual adds stay eager; under pp alone (no DTensor) the whole sublayers, norms included."""
    for _, block in _blocks(model):
        if tp > 1:
            for name in ("attn", "mlp"):
                sub = getattr(block, name)
                sub.forward = torch.compile(sub.forward)
        else:
            for name in ("attn_norm", "attn", "mlp_norm", "mlp"):
                getattr(block, name).compile()


# ---- pipeline parallel ----------------------------------------------------------------------------------


class StageModule(nn.Module):
    """One pipeline stage cut from a :class:`Transformer`: blocks ``layers``, with the token (and
    position) embedding on the first stage and the final norm and head on the last. Parameter
    names are the full model's (``blocks`` is a ModuleDict keyed by layer index).

    ``forward(h)``: token ids (B, T) on the first stage, else the previous stage's hidden states
    (B, T / seq_shards, D); returns hidden states, or logits on the last stage. What else a stage
    needs travels with them: under ``train.document_mask`` the attention mask (``mask_fn(ids)``
    on the first stage), and in an MoE model the running sum of the router losses:
    ``forward(h, mask, aux)`` returns ``(h, mask, aux + this stage's router losses)`` (each part
    only when it applies; ``aux`` of shape (1,)), so the last stage's output ``(logits, aux)``
    carries the sum over every layer, and its gradient flows back through each stage's routers
    as in one process.

    A tied head (``model.tie_embeddings``): the last stage holds the embedding module too (unused
    in its forward), so the one weight goes by its one-process name ``embed.weight`` on both
    stages that hold it, and FSDP2 / DDP see it as one parameter shared by two modules of the
    stage. :meth:`ParallelModel.sync_tied_grads` sums its two gradients.
    """

    def __init__(self, model: Transformer, layers: range, first: bool, last: bool, seq_shards: int = 1,
                 mask_fn=None):
        super().__init__()
        self.cfg, self.seq_shards, self.first, self.moe = model.cfg, seq_shards, first, model.cfg.n_experts > 0
        self.mask_fn, self.masked, self.last = mask_fn, mask_fn is not None, last
        self.embed = model.embed if first or (last and model.cfg.tie_embeddings) else None
        self.pos_embed = getattr(model, "pos_embed", None) if first else None
        self.drop = model.drop
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        if model.cfg.positions == "rope":
            self.register_buffer("rope_cos", model.rope_cos, persistent=False)
            self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, h: torch.Tensor, *carried: torch.Tensor):
        carried = list(carried)
        mask = aux = None
        if self.first:
            T = h.size(1)
            ids, h = h, self.embed(h)
            if self.pos_embed is not None:
                h = h + self.pos_embed(torch.arange(T, device=ids.device))
            h = self.drop(h)
            if self.masked:
                mask = self.mask_fn(ids)
        else:
            T = h.size(1) * self.seq_shards
            if self.masked:
                mask = carried.pop(0)
            if self.moe:
                aux = carried.pop(0)
        rope = (self.rope_cos[:T], self.rope_sin[:T]) if self.cfg.positions == "rope" else None
        router = []
        for block in self.blocks.values():
            h, stats = block(h, rope, None, mask)
            if stats is not None:
                router.append(stats.aux_loss)
        if self.lm_head is None:
            out = [h]
        else:
            logits = self.lm_head(self.norm(h))
            cap = self.cfg.logit_softcap  # (Transformer.softcap)
            out = [cap * torch.tanh(logits / cap) if cap else logits]
        if self.masked and not self.last:
            out.append(mask)
        if self.moe:
            if aux is None:  # shape (1,): the schedule concatenates the last stage's outputs of the micro-batches
                aux = torch.zeros(1, device=ids.device)
            out.append(aux + torch.stack(router).sum() if router else aux)
        return out[0] if len(out) == 1 else tuple(out)


def cut_stages(model: Transformer, tc, env, mask_fn=None) -> tuple[nn.Module, list[tuple[int, StageModule]]]:
    """``(part, [(stage index, StageModule), ...])``: this process's stages, and ``part``, one
    module holding all their parameters under the full model's names (what the optimizer,
    gradient clipping and checkpoints see). The blocks of other processes are dropped."""
    v = stages_per_rank(tc)
    n_stages = tc.pp * v
    ranges = split_layers(model.cfg.n_layer, n_stages, tc.pp_split)
    shards = env.tp if (env.tp > 1 and tc.sequence_parallel) else 1
    mine = [env.pp_rank + j * tc.pp for j in range(v)]
    stages = [(s, StageModule(model, ranges[s], s == 0, s == n_stages - 1, shards, mask_fn)) for s in mine]
    part = nn.Module()
    for name in ("embed", "pos_embed", "norm", "lm_head"):
        owners = [m for _, m in stages if getattr(m, name) is not None]
        setattr(part, name, getattr(owners[0], name) if owners else None)
    part.blocks = nn.ModuleDict({i: b for _, m in stages for i, b in m.blocks.items()})
    return part, stages


def tied_weight_group(env):
    """The process group of the two processes that hold a tied weight in this process's model
    replica and tensor-parallel slice (pp rank 0: the embedding; the last pp rank: the head);
    None on the processes in between. Every process creates every pair (``new_group`` is collective)."""
    mine, dp = None, env.dp
    for d in range(dp):
        for t in range(env.tp):
            pair = [d * env.tp + t, ((env.pp - 1) * dp + d) * env.tp + t]
            group = tdist.new_group(pair)
            if env.rank in pair:
                mine = group
    return mine


def build_schedule(stage_modules, tc, env, n_micro: int, loss_fn):
    """PipelineStage objects over the ``pp`` group and the schedule that runs them."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    group = env.mesh["pp"].get_group()
    n_stages = tc.pp * stages_per_rank(tc)
    stages = [PipelineStage(m, s, n_stages, env.device, group=group) for s, m in stage_modules]
    if tc.pp_schedule == "interleaved-1f1b":
        return ScheduleInterleaved1F1B(stages, n_microbatches=n_micro, loss_fn=loss_fn, scale_grads=False)
    kind = ScheduleGPipe if tc.pp_schedule == "gpipe" else Schedule1F1B
    return kind(stages[0], n_microbatches=n_micro, loss_fn=loss_fn, scale_grads=False)


# ---- the model as this process holds it --------------------------------------------------------------------


class ParallelModel:
    """The model under ``train.tp`` / ``train.pp`` (with DDP / FSDP2 on the dp dim), and the
    parts of a training step that change with the layout: the loss over (maybe vocab-split)
    logits, a pipelined step, evaluation, the global gradient norm, and loading a full optimizer state.

    ``module``: what this process holds, under the full model's parameter names (the whole
    Transformer for tp alone, the stages' part of it under pp). ``fwd``: the forward a training
    step calls (None under pp, where the schedule runs the stages).
    """

    def __init__(self, model: Transformer, tc, env, k: int, fill=None, mask_fn=None):
        """``model`` may be on the meta device; then ``fill(modules)`` allocates and initialises this
        process's part (:func:`text2llm.train.materialize.materialize`) once it is split: before the
        DDP wrapper (which broadcasts real values), after FSDP2's (which shards on the meta device)."""
        self.tc, self.env, self.k = tc, env, k
        tp_mesh = env.mesh["tp"]
        self.loss_parallel = env.tp > 1 and tc.loss_parallel  # logits stay split by vocab
        self.nll = vocab_parallel_nll(tp_mesh) if self.loss_parallel else token_nll_sum
        self.schedule, self.fwd, self.stage_modules = None, None, []
        self.first = self.last = True  # (pipeline: whether this process holds the first / the last stage)
        self.tie_group, self.moe, self._train_step, self._nll_parts, self._aux_parts = None, False, False, [], []
        fill = fill or (lambda modules: None)
        if env.pp == 1:
            if env.tp > 1:
                apply_tp(model, tp_mesh, tc.sequence_parallel, tc.loss_parallel)
            if tc.compile:
                compile_blocks(model, env.tp)
            [(self.fwd, self.dp_wrapper)] = self._fill_and_wrap([model], fill)
            self.module = model
            return
        self.dp_wrapper = None
        self.module, stage_modules = cut_stages(model, tc, env, mask_fn)
        n_stages = tc.pp * stages_per_rank(tc)
        self.first = any(s == 0 for s, _ in stage_modules)
        self.last = any(s == n_stages - 1 for s, _ in stage_modules)
        self.tie_group = tied_weight_group(env) if model.cfg.tie_embeddings else None
        self.moe, self._train_step, self._nll_parts, self._aux_parts = model.cfg.n_experts > 0, False, [], []
        if env.tp > 1:
            apply_tp(self.module, tp_mesh, tc.sequence_parallel, tc.loss_parallel)
        if tc.compile:
            compile_blocks(self.module, env.tp)
        wrapped = self._fill_and_wrap([m for _, m in stage_modules], fill)
        stage_modules = [(s, fwd) for (s, _), (fwd, _) in zip(stage_modules, wrapped)]
        self.stage_modules = [m for _, m in stage_modules]
        self._scale = 1.0
        self.schedule = build_schedule(stage_modules, tc, env, k, self._pp_loss)

    def _fill_and_wrap(self, modules: list, fill) -> list:
        """Allocate and initialise ``modules`` and wrap each for the dp dim (``wrap_model``'s
        ``(fwd, wrapper)`` for each): FSDP2 shards on the meta device, so it wraps first; DDP
        broadcasts real values, so it wraps last, after the tp gradient hooks."""
        if self.env.mode == "fsdp":  # (FSDP2 reduces the gradients itself: no tp hooks)
            wrapped = [D.wrap_model(m, self.env) for m in modules]
            fill(modules)
            return wrapped
        fill(modules)
        for m in modules:
            register_grad_hooks(m)
        return [D.wrap_model(m, self.env) for m in modules]

    def context(self):
        """``loss_parallel()`` when the logits are split by vocab (the loss and its backward run
        inside it), else a no-op context."""
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel() if self.loss_parallel else nullcontext()

    # ---- a pipelined step ----

    def _pp_loss(self, output, targets):
        """The schedule's loss of one micro-batch on the last stage: its token NLL scaled to this
        process's share of the objective, plus (MoE) the router losses of every layer, weighted
        1 / k as :func:`text2llm.train.trainer.forward_backward` weighs them (none in evaluation)."""
        logits, aux = output if self.moe else (output, None)
        nll = self.nll(logits, targets) * self._scale
        self._nll_parts.append(nll.detach().float())
        if aux is None or not self._train_step:
            return nll
        aux = aux.sum()
        self._aux_parts.append(aux.detach().float() / self.k)
        return nll + aux / self.k

    def pipeline_step(self, batches, denom: float, amp_dtype=None):
        """Forward and backward of the ``k`` micro-batches through the schedule; returns ``(this
        process's share of the global mean loss, its share of the router losses (MoE, else None))``,
        zeros on processes without the last stage."""
        env = self.env
        x = torch.cat([b[0] for b in batches]).to(env.device)
        y = torch.cat([b[1] for b in batches]).to(env.device)
        self._scale = env.dp / max(1.0, denom)  # d(objective) = d(sum of token NLL / denom) * dp (DP averages)
        self._nll_parts, self._aux_parts, self._train_step = [], [], True
        with self.context(), torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            self._run(self.schedule.step, x, y, [])
        self._train_step = False
        self.sync_tied_grads()
        zero = torch.zeros((), device=env.device)
        # the last k calls are the step's micro-batches (a schedule's first step, and its first after
        # an evaluation, may call the loss once more while it infers the stages' shapes)
        nll, aux = self._nll_parts[-self.k:], self._aux_parts[-self.k:]
        loss = torch.stack(nll).sum() / env.dp if nll else zero
        if not self.moe:
            return loss, None
        # the trainer logs all_reduce_sum(aux) / world_size: only the tp * dp last-stage processes hold it
        aux = torch.stack(aux).sum() * env.pp if aux else zero
        return loss, aux

    def _run(self, fn, x, y, losses):
        kwargs = {"target": y, "losses": losses} if self.last else {}
        if self.first:
            fn(x, **kwargs)
        else:
            fn(**kwargs)

    def sync_tied_grads(self) -> None:
        """A tied head under pp: the embedding's gradient (first stage) and the head's (last stage)
        are two parts of one weight's gradient; each of the two processes gets their sum (one
        all-reduce of the local tensor over the two, after the dp reduction), so both apply the
        same update and the copies stay equal."""
        if self.tie_group is None or not (self.first or self.last):
            return
        g = self.module.embed.weight.grad
        if g is not None:
            tdist.all_reduce(g.to_local() if hasattr(g, "to_local") else g, group=self.tie_group)

    # ---- evaluation ----

    def eval_nll(self, loader, n_batches: int, amp_dtype=None, attn_mask_fn=None):
        """(sum of token NLL, target count) over ``n_batches`` val batches on the processes that
        hold the loss (zeros elsewhere, for the caller's all-reduce). Under pp the batches go
        through the schedule ``k`` at a time, the last group filled up with batches that score nothing."""
        env = self.env
        if self.schedule is None:
            with self.context():
                total, count = loader_nll(self.fwd, loader, n_batches, env.device, amp_dtype, attn_mask_fn,
                                          nll_fn=self.nll)
        else:
            total = torch.zeros((), dtype=torch.float64, device=env.device)
            count = torch.zeros((), dtype=torch.float64, device=env.device)
            batches = list(val_batches(loader, n_batches))
            self._scale = 1.0
            for m in self.stage_modules:
                m.eval()
            with torch.no_grad(), self.context(), torch.autocast(env.device.type, dtype=amp_dtype,
                                                                   enabled=amp_dtype is not None):
                for i in range(0, len(batches), self.k):
                    group = batches[i : i + self.k]
                    group += [(group[-1][0], torch.full_like(group[-1][1], IGNORE_INDEX))] * (self.k - len(group))
                    y = torch.cat([b[1] for b in group]).to(env.device)
                    losses: list = []
                    self._run(self.schedule.eval, torch.cat([b[0] for b in group]).to(env.device), y, losses)
                    if losses:
                        total += torch.stack([loss.double() for loss in losses]).sum()
                        count += count_targets(y)
            for m in self.stage_modules:
                m.train()
        if not env.holds_loss:
            total.zero_(), count.zero_()
        return total, count

    # ---- the global gradient norm ----

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip to ``max_norm`` (inf = only measure) by the norm over every parameter of the
        model: DTensor shards (tp, fsdp) summed through their meshes, pipeline stages through
        one all-reduce of the squared norm over the ``pp`` dim."""
        from torch.distributed.tensor import DTensor

        by_mesh: dict = {}  # plain tensors (None), and DTensors by mesh: foreach ops take one kind at a time
        for p in self.module.parameters():
            if p.grad is not None:
                by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
        # a tied weight held by the first and the last stage counts once, on the first
        twin = self.module.embed.weight if self.tie_group is not None and self.last and not self.first else None
        sq = torch.zeros((), device=self.env.device)
        for params in by_mesh.values():
            counted = [p.grad for p in params if p is not twin]
            if not counted:
                continue
            norm = torch.nn.utils.get_total_norm(counted)
            sq = sq + (norm.full_tensor() if isinstance(norm, DTensor) else norm).float() ** 2
        if self.env.pp > 1:
            tdist.all_reduce(sq, group=self.env.mesh["pp"].get_group())
        total = sq.sqrt()
        if math.isfinite(max_norm):
            for params in by_mesh.values():
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        """Load a full, name-keyed optimizer state (an ``optimizer.pt`` of one process or DDP, keyed by
        name by the caller); a stage takes its own parameters."""
        names = {n for n, _ in self.module.named_parameters()}
        D.load_optimizer_state(self.module, optimizer, restrict_optimizer_state(state, names), by_name=True)


# ---- name-keyed optimizer states --------------------------------------------------------------------------


def restrict_optimizer_state(state: dict, names: set[str]) -> dict:
    """The part of a name-keyed optimizer state that covers the parameters ``names``."""
    groups = []
    for g in state["param_groups"]:
        keep = [p for p in g["params"] if p in names]
        groups.append({**g, "params": keep, **({"names": keep} if "names" in g else {})})
    return {"state": {k: v for k, v in state["state"].items() if k in names},
            "param_groups": [g for g in groups if g["params"]]}


def optimizer_state_by_name(state: dict) -> dict:
    """A plain ``optimizer.state_dict()`` (parameters numbered) keyed by parameter name instead,
    from the ``names`` each of our parameter groups carries (:func:`text2llm.train.optim.param_groups`)."""
    number_to_name = {i: n for g in state["param_groups"] for i, n in zip(g["params"], g["names"])}
    return {"state": {number_to_name[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": list(g["names"])} for g in state["param_groups"]]}
