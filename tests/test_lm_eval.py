"""lm-evaluation-harness on a text2llm checkpoint (`text2llm eval --tasks`): two local task YAMLs
over jsonl files written here (offline, `dataset_path: json`), one scored by perplexity
(loglikelihood_rolling), one multiple choice (loglikelihood); the harness's numbers equal the
ones text2llm computes itself with evaluate.score_stream and loss.token_nll_sum."""

from __future__ import annotations

import json
import math

import pytest
import torch

from test_generate import shared_checkpoint
from conftest import tiny_stories

import text2llm
from text2llm.cli import main
from text2llm.evaluate import score_stream
from text2llm.loss import IGNORE_INDEX, bits_per_byte, token_nll_sum

pytest.importorskip("lm_eval")

PPL_TASK = """task: t2l_local_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""

CHOICE_TASK = """task: t2l_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory):
    """A dir of task YAMLs and their jsonl data; the model and tokenizer they are scored with."""
    ckpt = shared_checkpoint(tmp_path_factory)
    model, tok = text2llm.load(ckpt)
    d = tmp_path_factory.mktemp("tasks")
    # short documents: one rolling window each, where the harness's windows and evaluate's agree
    docs = []
    for rec in tiny_stories(40):
        text = rec["text"].split(". ")[0][:90]
        if len(tok.encode(text)) < model.cfg.max_seq_len - 1:
            docs.append(text)
    docs = docs[:6]
    (d / "ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    qs = [{"question": "Once upon a time there was a", "choices": ["girl", "dog", "tree"], "answer": 0},
          {"question": "The sun was", "choices": ["hot", "happy"], "answer": 1},
          {"question": "Tom and Lily went to the", "choices": ["park", "moon", "shop"], "answer": 0}]
    (d / "choice.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    (d / "ppl.yaml").write_text(PPL_TASK.format(data=d / "ppl.jsonl"))
    (d / "choice.yaml").write_text(CHOICE_TASK.format(data=d / "choice.jsonl"))
    return ckpt, model, tok, d, docs, qs


def test_perplexity_task_through_the_cli_equals_our_loss(local_tasks, capsys):
    ckpt, model, tok, d, docs, _ = local_tasks
    rc = main(["eval", str(ckpt), "--tasks", "t2l_local_ppl", "--include-path", str(d), "--json"])
    assert rc == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["t2l_local_ppl"]
    nll = sum(score_stream(model, torch.tensor([tok.bos_id] + tok.encode(t)), model.cfg.max_seq_len)[0] for t in docs)
    words = sum(len(t.split()) for t in docs)
    n_bytes = sum(len(t.encode("utf-8")) for t in docs)
    assert got["word_perplexity,none"] == pytest.approx(math.exp(nll / words), rel=1e-5)
    assert got["bits_per_byte,none"] == pytest.approx(bits_per_byte(nll, 1, n_bytes), rel=1e-5)
    assert got["byte_perplexity,none"] == pytest.approx(2 ** bits_per_byte(nll, 1, n_bytes), rel=1e-5)


def test_multiple_choice_loglikelihoods_equal_ours(local_tasks):
    from text2llm.interop.lm_eval import evaluate_tasks

    _, model, tok, d, _, qs = local_tasks
    out = evaluate_tasks(model, tok, ["t2l_local_choice"], limit=3, include_path=str(d))
    samples = sorted(out["samples"]["t2l_local_choice"], key=lambda s: s["doc_id"])
    picks = []
    for q, s in zip(qs, samples):
        ours = []
        for choice in q["choices"]:
            ctx = [tok.bos_id] + tok.encode(q["question"])
            ids = [tok.bos_id] + tok.encode(q["question"] + " " + choice)
            y = torch.full((1, len(ids) - 1), IGNORE_INDEX)
            y[0, len(ctx) - 1:] = torch.tensor(ids[len(ctx):])
            with torch.no_grad():
                ours.append(-token_nll_sum(model(torch.tensor([ids[:-1]])).logits, y).item())
        theirs = [r[0][0] for r in s["resps"]]
        assert theirs == pytest.approx(ours, abs=1e-4)
        picks.append(int(max(range(len(ours)), key=ours.__getitem__) == q["answer"]))
    assert out["results"]["t2l_local_choice"]["acc,none"] == pytest.approx(sum(picks) / len(picks))


def test_generate_until_is_text2llm_generate(local_tasks):
    from text2llm.infer.generate import generate
    from text2llm.interop.lm_eval import Scorer

    _, model, tok, _, _, _ = local_tasks
    want = generate(model, tok, "Once upon a time", max_new_tokens=12, temperature=0)[len("Once upon a time"):]
    (got,) = Scorer(model, tok).generate_until([("Once upon a time", {"max_gen_toks": 12, "do_sample": False})])
    assert got == want
    stop = want[2:4]
    (cut,) = Scorer(model, tok).generate_until([("Once upon a time", {"max_gen_toks": 12, "until": [stop]})])
    assert cut == want[: want.index(stop)]


@pytest.mark.slow  # indexes the harness's own ~15k task files (~8 s here)
def test_unknown_task_is_one_line(local_tasks, capsys):
    ckpt, _, _, d, _, _ = local_tasks
    assert main(["eval", str(ckpt), "--tasks", "no_such_task_xyz", "--include-path", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown task 'no_such_task_xyz'" in err
