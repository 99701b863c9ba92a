"""The model: a decoder-only Transformer (``transformer.py``, with its MLP in ``mlp.py``, its
Mixture-of-Experts layer in ``moe.py`` and its sliding-window attention in ``attention.py``), the
KV cache it decodes with (``cache.py``) and its config (``config.py``)."""

from text2llm.model.config import ModelConfig

__all__ = ["ModelConfig", "Transformer", "KVCache", "ModelOutput"]


def __getattr__(name):  # lazy: importing the config must not import torch
    if name in ("Transformer", "KVCache", "ModelOutput"):
        from text2llm.model import transformer

        return getattr(transformer, name)
    raise AttributeError(name)
