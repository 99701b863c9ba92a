"""text2llm: from raw text to a trained, compressed, deployable language model.

Public API (kept small and stable):

    model, tokenizer = text2llm.load("runs/demo/train")      # a run dir or a checkpoint dir
    ids = tokenizer.encode("Once upon a time")                # list[int], no special tokens
    logits = model(torch.tensor([ids]))                       # (B, T, vocab)
    text = tokenizer.decode(ids)

Heavy libraries (torch, sentencepiece, ...) are imported only when used, so importing
``text2llm`` and running ``text2llm --help`` stay instant.
"""

__version__ = "0.1.0"

__all__ = ["load", "__version__"]


def load(ckpt, device: str = "cpu"):
    """Load ``(model, tokenizer)`` from a checkpoint dir or a run dir (its latest checkpoint),
    float or int8 (:func:`text2llm.artifacts.load`).

    The model is in eval mode; ``model(input_ids)`` returns logits of shape (B, T, vocab).
    """
    from text2llm.artifacts import load as load_artifact

    return load_artifact(ckpt, device=device)
