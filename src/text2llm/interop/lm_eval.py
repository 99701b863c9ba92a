"""lm-evaluation-harness on a text2llm checkpoint, without a Hugging Face round trip.

``text2llm eval CKPT --tasks NAMES [--limit N] [--include-path DIR]`` runs the harness's
``lm_eval.simple_evaluate`` with the checkpoint's model behind the harness's ``LM`` interface
(:func:`harness_model`); the three request types are answered by :class:`Scorer`, which the
harness never sees:

| harness request                           | how text2llm answers it                                          |
|-------------------------------------------|------------------------------------------------------------------|
| ``loglikelihood(context, continuation)``  | BOS + context + continuation through the model once; the sum of the continuation tokens' log-probabilities (:func:`text2llm.loss.token_nll_sum` with the context's targets ignored) and whether greedy decoding would produce them |
| ``loglikelihood_rolling(text)``           | BOS + text in the harness's own rolling windows of the model's context (every token predicted once, each window with as much context as fits), summed the same way |
| ``generate_until(context, kwargs)``       | the decoding loop of ``text2llm generate`` (:func:`text2llm.infer.decoding.complete`): greedy unless ``do_sample``, stopping at EOS, any ``until`` string or ``max_gen_toks`` |

A continuation is tokenised as the harness's Hugging Face models do it: trailing spaces of the
context move to the continuation, and the continuation's ids are those of ``context +
continuation`` after the context's own (so a merge across the boundary is scored where it falls).

Tasks: any the installed harness knows (``lm_eval --tasks list``) or a task YAML in
``--include-path``. Their datasets come from wherever the task says; a task whose dataset is on
the Hugging Face hub needs it downloaded first (text2llm never fetches one): e.g. run the
harness once online, or point a local YAML at files (``dataset_path: json``,
``dataset_kwargs: {data_files: ...}``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from text2llm.errors import UserError, require
from text2llm.infer.decoding import SamplingParams, complete
from text2llm.infer.generate import TorchEngine
from text2llm.loss import IGNORE_INDEX, token_nll_sum


class Scorer:
    """Log-likelihoods and generations of a text2llm model, in the harness's terms."""

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model, self.tok, self.batch_size = model.eval(), tokenizer, batch_size
        self.max_len = model.cfg.max_seq_len

    # ---- tokenisation ----------------------------------------------------------------------
    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(BOS + context ids, continuation ids), as the harness's HF models split them."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        ctx = self.tok.encode(context) if context else []
        whole = self.tok.encode(context + continuation)
        return [self.tok.bos_id] + ctx, whole[len(ctx):]

    # ---- scoring ---------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), greedy?) per pair. Rows hold the last
        max_seq_len + 1 tokens of context + continuation, right-padded (causal attention: the
        padding never reaches a real position)."""
        out = []
        for i in range(0, len(pairs), self.batch_size):
            chunk = pairs[i : i + self.batch_size]
            rows = [(ctx + cont)[-(self.max_len + 1):] for ctx, cont in chunk]
            T = max(len(r) for r in rows) - 1
            x = torch.full((len(rows), T), self.tok.pad_id, dtype=torch.long)
            y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
            for b, (row, (_, cont)) in enumerate(zip(rows, chunk)):
                x[b, : len(row) - 1] = torch.tensor(row[:-1])
                n = min(len(cont), len(row) - 1)  # a continuation longer than the context keeps its tail
                y[b, len(row) - 1 - n : len(row) - 1] = torch.tensor(row[len(row) - n:])
            logits = self.model(x).logits
            greedy = logits.argmax(-1)
            for b in range(len(rows)):
                scored = y[b] != IGNORE_INDEX
                nll = token_nll_sum(logits[b : b + 1], y[b : b + 1]).item()
                out.append((-nll, bool((greedy[b][scored] == y[b][scored]).all())))
        return out

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self.score([self.pair(ctx, cont) for ctx, cont in requests])

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for text in texts:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok.encode(text), prefix_token=self.tok.bos_id, max_seq_len=self.max_len, context_len=1)]
            out.append(sum(ll for ll, _ in self.score(windows)))
        return out

    def generate_until(self, requests: Sequence[tuple[str, dict]]) -> list[str]:
        engine = TorchEngine(self.model)
        learned = self.model.cfg.positions == "learned"
        out = []
        for context, kw in requests:
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kw.get("max_gen_toks", 256))
            temperature = float(kw.get("temperature", 1.0)) if kw.get("do_sample") else 0.0
            p = SamplingParams(max_new_tokens=n, temperature=temperature, top_k=0, stop=tuple(until))
            ids = [self.tok.bos_id] + self.tok.encode(context)
            ids = ids[-max(1, self.max_len - n):]  # keep room for the answer, as the harness's HF models do
            (c,) = complete(engine, self.tok, [], p, prompt_ids=[ids], learned_positions=learned)
            out.append(c.text)
        return out


def harness_model(model, tokenizer, batch_size: int = 8):
    """``model`` behind lm-evaluation-harness's ``lm_eval.api.model.LM`` interface."""
    from lm_eval.api.model import LM

    class Text2LLM(LM):
        def __init__(self):
            super().__init__()
            self.scorer = Scorer(model, tokenizer, batch_size)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self.scorer.loglikelihood([r.args for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self.scorer.generate_until([r.args for r in requests])

    return Text2LLM()


def evaluate_tasks(model, tokenizer, tasks: Sequence[str], limit: int | None = None,
                   include_path: str | None = None, num_fewshot: int | None = None) -> dict:
    """``lm_eval.simple_evaluate`` of ``tasks`` on ``model``: the harness's results dict
    (``results[task][metric]``, ``samples`` with every request and its answer)."""
    require("lm_eval", "eval", "eval --tasks")
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path:  # indexing the harness's own ~15k task files takes seconds: only when needed
        manager = TaskManager(include_path=include_path, include_defaults=False)
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (nor in {include_path})" if include_path else " (give --include-path DIR for local task YAMLs)"
        raise UserError(f"--tasks: unknown task {', '.join(map(repr, unknown))}: not a task of lm-eval "
                        f"{lm_eval.__version__}{where}")
    with torch.no_grad():
        return lm_eval.simple_evaluate(model=harness_model(model, tokenizer), tasks=list(tasks), limit=limit,
                                       num_fewshot=num_fewshot, task_manager=manager, log_samples=True)
