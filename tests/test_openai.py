"""The official `openai` client against a live `text2llm serve` (a subprocess on 127.0.0.1, port
0): chat, streamed chat, n choices, completions with stop and logprobs, and errors raised as the
client's own exception types (400 BadRequestError, 404 NotFoundError)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from test_generate import shared_checkpoint

import text2llm
from text2llm.artifacts import open_engine
from text2llm.infer.decoding import SamplingParams, chat_prompt, complete

openai = pytest.importorskip("openai")

CHAT = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me about a cat."}]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """`text2llm serve CKPT --port 0` in its own process; the client; the checkpoint."""
    ckpt = shared_checkpoint(tmp_path_factory)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "text2llm", "serve", str(ckpt), "--port", "0",
                             "--max-tokens-limit", "32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, proc.stderr.read()
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        yield client, ckpt
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def ours(live):
    """What text2llm itself answers (in this process), to compare the server's answers with."""
    served = open_engine(live[1])
    model, tok = text2llm.load(live[1])

    def chat(messages, n):
        ids, p = chat_prompt(served.tokenizer, messages, SamplingParams(max_new_tokens=n, temperature=0))
        (c,) = complete(served.engine, served.tokenizer, [], p, prompt_ids=[ids], lstrip=True)
        return c.text

    def text(prompt, n, stop=()):
        p = SamplingParams(max_new_tokens=n, temperature=0, stop=tuple(stop))
        (c,) = complete(served.engine, served.tokenizer, [prompt], p)
        return c.text

    return chat, text, model, tok


def test_chat(live, ours):
    client, _ = live
    r = client.chat.completions.create(model="m", messages=CHAT, temperature=0, max_tokens=16)
    (c,) = r.choices
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert c.message.role == "assistant" and c.message.content == ours[0](CHAT, 16)
    assert c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(ours[3].encode_chat(CHAT)) and r.usage.completion_tokens <= 16
    # n choices, one batch: sampled with a seed, reproducible
    kw = dict(model="m", messages=CHAT, temperature=1.0, max_tokens=8, n=3, seed=7)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


def test_chat_streaming(live, ours):
    client, _ = live
    chunks = list(client.chat.completions.create(model="m", messages=CHAT, temperature=0, max_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ours[0](CHAT, 16)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] in ("stop", "length") and not any(finish[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_completion_with_stop_and_logprobs(live, ours):
    client, _ = live
    _, text, model, tok = ours
    prompt = "Once upon a time"
    want = text(prompt, 12)
    stop = want[4:6]
    r = client.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=12, stop=[stop])
    assert r.choices[0].text == text(prompt, 12, [stop]) == want[: want.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=12, logprobs=3)
    (c,) = r.choices
    lp = c.logprobs
    assert c.text == want and "".join(lp.tokens) == want
    assert lp.text_offset[0] == len(prompt) and lp.text_offset == sorted(lp.text_offset)
    assert all(len(d) in (3, 4) for d in lp.top_logprobs)  # the 3 best, and the drawn token if not among them
    # each token's logprob is the model's log-softmax at that position (recomputed here in one forward)
    ids = [tok.bos_id] + tok.encode(prompt)
    new = tok.encode(want)[: len(lp.tokens)]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids + new])).logits[0].float(), -1)
    want_lp = [logp[len(ids) - 1 + k, t].item() for k, t in enumerate(new)]
    np.testing.assert_allclose(lp.token_logprobs, want_lp, atol=1e-4)
    # chat logprobs: the chat shape, same numbers
    r = client.chat.completions.create(model="m", messages=CHAT, temperature=0, max_tokens=6, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert content and all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in content)


def test_errors_are_openai_exceptions(live):
    client, _ = live
    bad = [(dict(messages=CHAT, max_tokens=33), "max_tokens"),  # over --max-tokens-limit
           (dict(messages=[{"role": "robot", "content": "hi"}]), "messages"),
           (dict(messages=[]), "messages"),
           (dict(messages=CHAT, n=9), "n"),
           (dict(messages=CHAT, stream=True, logprobs=True), "logprobs")]
    for kw, param in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", **kw)
        assert e.value.status_code == 400 and e.value.body["param"] == param, kw
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="m", prompt="Tom", logprobs=9)
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope")  # GET /v1/models/nope: no such route
    assert e.value.status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.post("/embeddings", body={"input": "x"}, cast_to=object)
    # and the server is still there
    assert client.models.list().data[0].object == "model"
