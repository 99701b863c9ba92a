"""Build a sharded model without any process holding it whole (meta-device init).

Under FSDP2, tensor or pipeline parallelism, the trainer builds the :class:`Transformer` on the
``meta`` device (shapes only, no memory), splits and wraps it there (tensor parallel, the pipeline
cut, ``fully_shard``), and only then allocates each process's part (``to_empty``) and fills it:
:func:`materialize`. A process's peak is its own shard plus one full-size tensor at a time.

The values are exactly those of one process building the model eagerly with the same seed, so
every layout trains the same model (tests/test_parallel.py compares losses with one process).
That takes two steps, both walking the full model's tensors one at a time on every process:

1. **The constructors' draws.** An eager ``Transformer(cfg)`` first runs each layer's own
   ``reset_parameters`` (``nn.Linear``: Kaiming-uniform; ``nn.Embedding``: normal), then
   :meth:`Transformer.init_weights` overwrites everything. Those first draws leave the global RNG
   where ``init_weights`` starts, so they are replayed: each such layer is copied to the CPU
   and reset, then dropped (:func:`replay_constructor_draws`).
2. **The init.** For each parameter in :meth:`Transformer.init_weights`'s order, the full tensor is
   drawn on the CPU (:meth:`Transformer.init_param`), and this process keeps its part of it:
   a DTensor (tensor parallel, FSDP2 or both) takes its local shard through ``distribute_tensor``
   with ``src_data_rank=None`` (each process slices its own copy: no communication); a plain
   parameter (a pipeline stage's, or a replicated one) takes the whole tensor; a parameter that
   lives on another pipeline stage is drawn and dropped, so the RNG stays in step.

Weights from a file (``train.init_from``, or resuming from a plain checkpoint) are read the same
way, one tensor at a time from the safetensors file (after the init, as the eager path does).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn

from text2llm.errors import UserError
from text2llm.model.transformer import Transformer


def meta_model(cfg) -> Transformer:
    """The model's shapes on the ``meta`` device: no memory, no RNG draws."""
    with torch.device("meta"):
        return Transformer(cfg)


def replay_constructor_draws(reference: Transformer) -> None:
    """Draw from the global RNG what an eager ``Transformer(cfg)``'s layer constructors draw
    before :meth:`~Transformer.init_weights` (one layer at a time on the CPU, then dropped)."""
    for module in reference.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            tmp = copy.deepcopy(module).to_empty(device="cpu")
            tmp.reset_parameters()
            del tmp


def materialize(modules: list[nn.Module], cfg, device: torch.device, seed: int,
                weights: Path | None = None) -> None:
    """Allocate ``modules`` (this process's part of the model of ModelConfig ``cfg``, built, split
    and maybe wrapped on the meta device, under the full model's parameter names) on ``device``
    and fill them with the values an eager build under ``torch.manual_seed(seed)`` has, then
    ``weights`` if given. Leaves the global RNG where an eager build leaves it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    reference = meta_model(cfg)  # pristine: the modules' own layers may be split or wrapped by now
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # keep each Parameter object (ties, FSDP2's)
    try:
        for m in modules:
            m.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    if reference.cfg.positions == "rope":
        cos, sin = reference.rope_buffers(device)
        for m in modules:
            for sub in m.modules():
                if "rope_cos" in sub._buffers:
                    sub.rope_cos, sub.rope_sin = cos, sin
    mine: dict[str, list[torch.Tensor]] = {}
    for m in modules:
        for name, p in m.named_parameters(remove_duplicate=False):
            mine.setdefault(_plain_name(name), []).append(p)
    aliases: dict[int, list[str]] = {}  # a tied weight: every name it goes by
    for name, p in reference.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)

    def place(full: torch.Tensor, names: list[str]) -> None:
        for name in names:
            for p in mine.get(name, []):
                if isinstance(p, DTensor):
                    local = distribute_tensor(full.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)
                    p.to_local().copy_(local.to_local())
                else:
                    p.copy_(full)

    torch.manual_seed(seed)
    replay_constructor_draws(reference)
    params = list(reference.named_parameters())
    with torch.no_grad():
        for name, ref in params:
            full = torch.empty(ref.shape, dtype=ref.dtype)
            reference.init_param(name, full)
            place(full.to(device), aliases[id(ref)])
        if weights is not None:
            _load_streamed(weights, reference, params, aliases, place, device)


def _load_streamed(path: Path, reference: Transformer, params, aliases, place, device) -> None:
    """``place`` each tensor of the safetensors file ``path``, one at a time; the same one-line
    errors as :func:`text2llm.checkpoint.load_weights` when the file does not fit the model."""
    from safetensors import safe_open

    expected = {name for ids in aliases.values() for name in ids}
    allowed_missing = {"lm_head.weight"} if reference.cfg.tie_embeddings else set()
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        missing, unexpected = expected - keys - allowed_missing, keys - expected
        if missing or unexpected:
            raise UserError(f"{path}: weights do not match the model (missing {sorted(missing)[:5]}, "
                            f"unexpected {sorted(unexpected)[:5]})")
        for name, ref in params:
            key = next(n for n in aliases[id(ref)] if n in keys)
            t = f.get_tensor(key)
            if tuple(t.shape) != tuple(ref.shape):
                raise UserError(f"{path}: weights do not match the model config ({key}: shape {tuple(t.shape)} "
                                f"in the file, {tuple(ref.shape)} in the model)")
            place(t.to(device), aliases[id(ref)])


def _plain_name(name: str) -> str:
    """A parameter's name in the full model, without what wrappers add (``torch.compile``'s
    ``_orig_mod.``, DDP's ``module.``)."""
    for prefix in ("_orig_mod.", "module."):
        name = name.replace(prefix, "")
    return name
