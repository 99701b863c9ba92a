"""The HTTP server over a real socket on 127.0.0.1 (ephemeral port): completions, streaming,
bad requests answered 4xx while the server keeps serving, 20 concurrent requests, and an ONNX
export served with torch made unimportable."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from test_generate import shared_checkpoint, shared_export
from test_onnx import NO_TORCH

from text2llm.artifacts import open_engine

PROMPTS = ["Once upon a time", "Tom", "The little dog ran to the park and", "Lily"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import text2llm
    from text2llm.infer.generate import generate_batch
    from text2llm.infer.server import make_server

    ckpt = shared_checkpoint(tmp_path_factory)
    srv = make_server(open_engine(ckpt), port=0, max_tokens_limit=32, quiet=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    model, tok = text2llm.load(ckpt)
    want = {p: generate_batch(model, tok, [p], 12, temperature=0)[0] for p in PROMPTS}
    yield srv.server_address[1], want
    srv.shutdown()
    srv.server_close()


def request(port, method, path, body=None, raw: bytes | None = None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    return r.status, r.getheader("Content-Type"), text


def test_health_and_models(server):
    port, _ = server
    status, ctype, text = request(port, "GET", "/health")
    assert status == 200 and ctype.startswith("application/json")
    h = json.loads(text)
    assert h["status"] == "ok" and h["engine"] == "torch" and h["context"] == 64 and h["max_tokens_limit"] == 32
    assert json.loads(request(port, "GET", "/v1/models")[2])["data"][0]["object"] == "model"


def test_completion(server):
    port, want = server
    status, _, text = request(port, "POST", "/v1/completions",
                              {"model": "x", "prompt": "Tom", "max_tokens": 12, "temperature": 0})
    assert status == 200, text
    r = json.loads(text)
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-")
    (c,) = r["choices"]
    assert c["text"] == want["Tom"] and c["index"] == 0 and c["finish_reason"] in ("stop", "length")
    assert r["usage"]["completion_tokens"] <= 12 and r["usage"]["total_tokens"] == sum(
        r["usage"][k] for k in ("prompt_tokens", "completion_tokens"))
    # a batch of prompts, echo, and a stop string
    status, _, text = request(port, "POST", "/v1/completions",
                              {"prompt": PROMPTS[:2], "max_tokens": 12, "temperature": 0, "echo": True})
    assert [c["text"] for c in json.loads(text)["choices"]] == [p + want[p] for p in PROMPTS[:2]]
    stop = want["Tom"][3:5]
    text = request(port, "POST", "/v1/completions", {"prompt": "Tom", "max_tokens": 12, "temperature": 0,
                                                      "stop": [stop]})[2]
    c = json.loads(text)["choices"][0]
    assert c["text"] == want["Tom"][: want["Tom"].index(stop)] and c["finish_reason"] == "stop"


def test_streamed_completion(server):
    port, want = server
    status, ctype, text = request(port, "POST", "/v1/completions",
                                  {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "stream": True})
    assert status == 200 and ctype.startswith("text/event-stream")
    events = [e[len("data: "):] for e in text.split("\n\n") if e]
    assert all(e for e in events) and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 2
    assert "".join(c["choices"][0]["text"] for c in chunks) == want["Once upon a time"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


BAD = [
    ({"raw": b"{not json"}, 400, None),
    ({"body": [1, 2]}, 400, None),
    ({"body": {"max_tokens": 5}}, 400, "prompt"),
    ({"body": {"prompt": 5}}, 400, "prompt"),
    ({"body": {"prompt": "a", "max_tokens": 0}}, 400, "max_tokens"),
    ({"body": {"prompt": "a", "max_tokens": 33}}, 400, "max_tokens"),  # over --max-tokens-limit
    ({"body": {"prompt": "a", "max_tokens": "3"}}, 400, "max_tokens"),
    ({"body": {"prompt": "a", "temperature": -1}}, 400, "temperature"),
    ({"body": {"prompt": "a", "top_p": 0}}, 400, "top_p"),
    ({"body": {"prompt": "a", "stop": [1]}}, 400, "stop"),
    ({"body": {"prompt": "a", "stream": "yes"}}, 400, "stream"),
    ({"body": {"prompt": "a", "n": 9}}, 400, "n"),  # more choices than MAX_PROMPTS
    ({"body": {"prompt": ["a", "b"], "n": 5}}, 400, "n"),
    ({"body": {"prompt": ["a"] * 9}}, 400, "prompt"),
    ({"body": {"prompt": "word " * 500}}, 400, "prompt"),  # longer than the context
    ({"body": {"prompt": "a"}, "path": "/v1/chat"}, 404, None),
]


def test_bad_requests_get_4xx_and_server_keeps_serving(server):
    port, want = server
    for case, status_want, param in BAD:
        status, ctype, text = request(port, "POST", case.get("path", "/v1/completions"), case.get("body"),
                                      raw=case.get("raw"))
        assert status == status_want, (case, text)
        err = json.loads(text)["error"]
        assert err["message"] and err["type"] and err["param"] == param
    # a body over the limit (answered from the headers, before it is read), no Content-Length,
    # and a client that hangs up mid-request
    for head, code in ((b"Content-Length: 2000000\r\n", b" 413 "), (b"", b" 411 ")):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
        assert code in reply.split(b"\r\n")[0] and b'"error"' in reply
        s.close()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro")
    s.close()
    status, _, text = request(port, "POST", "/v1/completions", {"prompt": "Tom", "max_tokens": 12, "temperature": 0})
    assert status == 200 and json.loads(text)["choices"][0]["text"] == want["Tom"]


def test_20_concurrent_requests(server):
    port, want = server
    jobs = [(PROMPTS[i % len(PROMPTS)], i % 3 == 0) for i in range(20)]

    def one(job):
        prompt, stream = job
        status, _, text = request(port, "POST", "/v1/completions",
                                  {"prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": stream})
        assert status == 200, text
        if stream:
            events = [e[len("data: "):] for e in text.split("\n\n") if e][:-1]
            return "".join(json.loads(e)["choices"][0]["text"] for e in events)
        return json.loads(text)["choices"][0]["text"]

    with ThreadPoolExecutor(20) as pool:
        got = list(pool.map(one, jobs))
    assert got == [want[p] for p, _ in jobs]


def test_serve_onnx_export_without_torch(tmp_path_factory, server):
    _, want = server
    out = shared_export(tmp_path_factory)
    code = f"from text2llm.cli import main\nsys.exit(main(['serve', {str(out)!r}, '--port', '0']))\n"
    proc = subprocess.Popen([sys.executable, "-u", "-c", NO_TORCH + code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    try:
        line = proc.stdout.readline()
        assert "onnxruntime" in line and "http://127.0.0.1:" in line, proc.stderr.read() if not line else line
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        status, _, text = request(port, "POST", "/v1/completions", {"prompt": "Tom", "max_tokens": 12, "temperature": 0})
        assert status == 200 and json.loads(text)["choices"][0]["text"] == want["Tom"]
        assert json.loads(request(port, "GET", "/health")[2])["engine"] == "onnxruntime"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_compile_flag(tmp_path_factory, server, monkeypatch):
    """`serve --compile` runs the compiled engine's step, Transformer.decode_step (torch.compile
    replaced by the identity here: the real compile is test_generate's opt-in test), and answers
    the same text; an ONNX export refuses --compile."""
    import torch

    from text2llm.errors import UserError
    from text2llm.infer.server import make_server

    _, want = server
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    srv = make_server(open_engine(shared_checkpoint(tmp_path_factory), compile=True), port=0, max_tokens_limit=32,
                      quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        port = srv.server_address[1]
        for p in PROMPTS[:2]:
            status, _, text = request(port, "POST", "/v1/completions", {"prompt": p, "max_tokens": 12, "temperature": 0})
            assert status == 200 and json.loads(text)["choices"][0]["text"] == want[p]
        assert json.loads(request(port, "GET", "/health")[2])["engine"] == "torch, compiled"
    finally:
        srv.shutdown()
        srv.server_close()
    with pytest.raises(UserError, match="--compile applies to PyTorch checkpoints"):
        open_engine(shared_export(tmp_path_factory), compile=True)
    # an AOT export dir is compiled already
    from test_generate import _fake_aot_dir

    aot = _fake_aot_dir(tmp_path_factory.mktemp("aot"), shared_checkpoint(tmp_path_factory), None)
    with pytest.raises(UserError, match="compiled already"):
        open_engine(aot, compile=True)
