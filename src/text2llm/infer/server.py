"""An OpenAI-compatible completion server on the standard library's ``http.server``.

    text2llm serve runs/demo/train            # a checkpoint / run dir: PyTorch engine
    text2llm serve exports/onnx               # an ONNX export dir: onnxruntime engine, torch not imported

Endpoints::

    GET  /health           {"status": "ok", "model": ..., "engine": ..., "context": ..., "max_tokens_limit": ...}
    GET  /v1/models        the one model, OpenAI list format
    POST /v1/completions   {"prompt": str | [str, ...], "max_tokens": 16, "temperature": 1.0, "top_p": 1.0,
                            "stop": str | [str, ...], "stream": false, "seed": null, "echo": false,
                            "top_k": 0, "repetition_penalty": 1.0}        (the last two are extensions)

``stream: true`` answers with server-sent events, one ``data: {json}`` per piece of text and a
final ``data: [DONE]``. A list of prompts is decoded as one batch (``choices[i].index``).

Limits keep one request from taking the server down: request body <= 1 MiB, at most 8 prompts,
a prompt must fit the model's context (in tokens; 400 otherwise), ``max_tokens`` <= the
``--max-tokens-limit``, at most 64 requests waiting (503 beyond). Bad requests get a 4xx JSON
error in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``); the server keeps going.

Concurrency: each connection has its own thread (``ThreadingHTTPServer``); the model runs one
request at a time behind a lock (a FIFO queue in practice), so concurrent requests are all
answered, and a greedy request's text does not depend on what else is running.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from text2llm.errors import UserError
from text2llm.infer.decoding import SamplingParams, complete

MAX_BODY_BYTES = 1 << 20
MAX_PROMPTS = 8
MAX_STOP = 4
MAX_PENDING = 64
DEFAULT_MAX_TOKENS = 16  # OpenAI's default


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_


# ---- the model behind a lock ---------------------------------------------------------------------


class Backend:
    """One engine + tokenizer; ``run`` serialises requests through a lock."""

    def __init__(self, engine, tokenizer, name: str, kind: str, learned_positions: bool = False):
        self.engine, self.tok, self.name, self.kind = engine, tokenizer, name, kind
        self.learned_positions = learned_positions
        self.lock = threading.Lock()
        self.pending = 0
        self.pending_lock = threading.Lock()

    @classmethod
    def of(cls, served) -> "Backend":
        """From what :func:`text2llm.artifacts.open_engine` returns for a dir."""
        return cls(served.engine, served.tokenizer, served.name, served.kind, served.learned_positions)

    def run(self, prompt_ids, params, on_text=None):
        with self.pending_lock:
            if self.pending >= MAX_PENDING:
                raise ApiError(503, f"server busy: {self.pending} requests waiting, try again later", type_="server_error")
            self.pending += 1
        try:
            with self.lock:
                return complete(self.engine, self.tok, [], params, learned_positions=self.learned_positions,
                                on_text=on_text, prompt_ids=prompt_ids)
        finally:
            with self.pending_lock:
                self.pending -= 1


# ---- request parsing -----------------------------------------------------------------------------


def _number(body, key, default, lo, hi, integer=False, lo_open=False):
    v = body.get(key, default)
    if v is None:
        v = default
    kind = int if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kind):
        raise ApiError(400, f"'{key}' must be {'an integer' if integer else 'a number'}, got {json.dumps(v)}", key)
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise ApiError(400, f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", key)
    return v


def parse_request(body, backend: Backend, max_tokens_limit: int):
    """Validate a /v1/completions body -> (prompts, prompt ids, SamplingParams, stream, echo)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ApiError(400, "'prompt' is required: a string or a list of strings", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"'prompt' holds {len(prompts)} prompts; at most {MAX_PROMPTS} per request", "prompt")
    for key, want in (("n", 1), ("best_of", 1), ("logprobs", None), ("suffix", None)):
        if body.get(key, want) not in (want, None):
            raise ApiError(400, f"'{key}' is not supported (only {json.dumps(want)})", key)
    max_tokens = _number(body, "max_tokens", DEFAULT_MAX_TOKENS, 1, max_tokens_limit, integer=True)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and 0 < len(s) <= 200 for s in stop):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings", "stop")
    for key in ("stream", "echo"):
        if not isinstance(body.get(key, False), bool):
            raise ApiError(400, f"'{key}' must be true or false", key)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ApiError(400, "'seed' must be a non-negative integer", "seed")
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=_number(body, "top_k", 0, 0, 1_000_000, integer=True),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True),
        stop=tuple(stop), seed=seed,
    )
    tok, ctx = backend.tok, backend.engine.max_len
    ids = []
    for i, p in enumerate(prompts):
        if len(p) > 4 * MAX_BODY_BYTES:
            raise ApiError(400, "prompt too long", "prompt")
        x = [tok.bos_id] + tok.encode(p)
        if len(x) >= ctx:
            raise ApiError(400, f"prompt {i} is {len(x)} tokens; this model's context is {ctx} tokens "
                                f"(prompt + at least 1 new token)", "prompt")
        ids.append(x)
    return prompts, ids, params, body.get("stream", False), body.get("echo", False)


# ---- HTTP ----------------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    server: "CompletionServer"
    server_version = "text2llm"
    protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue` (curl, large bodies) answered at once
    timeout = 60  # seconds a client may take to send its request (or an idle keep-alive connection lingers)

    # -- plumbing
    def log_message(self, fmt, *args):
        if not self.server.quiet:
            sys.stderr.write(f"{self.address_string()} - {fmt % args}\n")

    def _json(self, status: int, obj) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if status == 503:
            self.send_header("Retry-After", "1")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: ApiError) -> None:
        self.close_connection = True  # the body may be unread: do not parse it as the next request
        try:
            self._json(e.status, {"error": {"message": e.message, "type": e.type, "param": e.param, "code": None}})
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the client went away before its error could be sent (e.g. it stopped mid-body)

    def _read_json(self):
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise ApiError(411, "send the body with a Content-Length (chunked requests are not supported)")
        if length is None:
            raise ApiError(411, "a Content-Length header is required")
        try:
            n = int(length)
        except ValueError:
            raise ApiError(400, "Content-Length is not a number") from None
        if n < 0 or n > MAX_BODY_BYTES:
            self.close_connection = True  # do not read the oversized body
            raise ApiError(413, f"request body of {n} bytes is larger than the limit of {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(n)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None

    # -- verbs
    def do_GET(self):
        b = self.server.backend
        if self.path == "/health":
            self._json(200, {"status": "ok", "model": b.name, "engine": b.kind, "context": b.engine.max_len,
                             "max_tokens_limit": self.server.max_tokens_limit})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": b.name, "object": "model", "owned_by": "text2llm"}]})
        else:
            self._error(ApiError(404, f"no route GET {self.path}", type_="not_found_error"))

    def do_POST(self):
        try:
            if self.path != "/v1/completions":
                raise ApiError(404, f"no route POST {self.path} (use /v1/completions)", type_="not_found_error")
            body = self._read_json()
            prompts, ids, params, stream, echo = parse_request(body, self.server.backend, self.server.max_tokens_limit)
            if stream:
                self._stream(prompts, ids, params, echo)
            else:
                self._complete(prompts, ids, params, echo)
        except ApiError as e:
            self._error(e)
        except UserError as e:
            self._error(ApiError(400, str(e)))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client went away or stalled; nothing to answer
        except Exception as e:  # a bug: answer 500, log it, keep serving
            import traceback

            traceback.print_exc()
            try:
                self._error(ApiError(500, f"internal error: {type(e).__name__}", type_="server_error"))
            except OSError:
                pass

    def do_PUT(self):
        self._error(ApiError(405, "method not allowed", type_="invalid_request_error"))

    do_DELETE = do_PATCH = do_PUT

    # -- completions
    def _head(self) -> dict:
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": self.server.backend.name}

    def _complete(self, prompts, ids, params, echo):
        done = self.server.backend.run(ids, params)
        choices = [{"text": (prompts[i] if echo else "") + c.text, "index": i, "logprobs": None,
                    "finish_reason": c.finish_reason} for i, c in enumerate(done)]
        used = sum(len(x) for x in ids), sum(c.tokens for c in done)
        self._json(200, {**self._head(), "choices": choices,
                         "usage": {"prompt_tokens": used[0], "completion_tokens": used[1], "total_tokens": sum(used)}})

    def _stream(self, prompts, ids, params, echo):
        head = self._head()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def send(obj) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
            self.wfile.write(f"data: {data}\n\n".encode("utf-8"))
            self.wfile.flush()

        def chunk(i, text, finish=None):
            return {**head, "choices": [{"text": text, "index": i, "logprobs": None, "finish_reason": finish}]}

        if echo:
            for i, p in enumerate(prompts):
                send(chunk(i, p))
        try:
            done = self.server.backend.run(ids, params, on_text=lambda i, s: send(chunk(i, s)))
        except ApiError as e:  # e.g. busy: the headers are gone, so report it as an event
            send({"error": {"message": e.message, "type": e.type, "param": e.param, "code": None}})
        else:
            for i, c in enumerate(done):
                send(chunk(i, "", c.finish_reason))
        send("[DONE]")


class CompletionServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, backend: Backend, max_tokens_limit: int, quiet: bool = False):
        super().__init__(addr, Handler)
        self.backend, self.max_tokens_limit, self.quiet = backend, max_tokens_limit, quiet


def make_server(served, host: str = "127.0.0.1", port: int = 8000, max_tokens_limit: int = 1024,
                quiet: bool = False) -> CompletionServer:
    """A bound (not yet serving) server over ``served`` (:func:`text2llm.artifacts.open_engine`'s
    result, or a :class:`Backend`). The server never chooses an engine. Port 0 = any free port."""
    if max_tokens_limit < 1:
        raise UserError(f"--max-tokens-limit: must be >= 1, got {max_tokens_limit}")
    backend = served if isinstance(served, Backend) else Backend.of(served)
    try:
        return CompletionServer((host, port), backend, max_tokens_limit, quiet)
    except OSError as e:
        raise UserError(f"{host}:{port}: cannot listen ({e.strerror or e})") from None


def serve(served, host: str = "127.0.0.1", port: int = 8000, max_tokens_limit: int = 1024) -> None:
    """``text2llm serve``: run until Ctrl-C."""
    srv = make_server(served, host, port, max_tokens_limit)
    h, p = srv.server_address[:2]
    b = srv.backend
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: anyone who can reach this port can use the model "
              "(there is no authentication)", file=sys.stderr)
    print(f"serving {b.name} ({b.kind}, context {b.engine.max_len}) on http://{h}:{p}  "
          f"(POST /v1/completions, GET /health; Ctrl-C stops)", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
