"""An OpenAI-compatible completion server on the standard library's ``http.server``.

    text2llm serve runs/demo/train            # a checkpoint / run dir: PyTorch engine
    text2llm serve exports/onnx               # an ONNX export dir: onnxruntime engine, torch not imported

Endpoints::

    GET  /health                {"status": "ok", "model": ..., "engine": ..., "context": ..., "max_tokens_limit": ...}
    GET  /v1/models             the one model, OpenAI list format
    POST /v1/completions        {"prompt": str | [str, ...], "max_tokens": 16, "temperature": 1.0, "top_p": 1.0,
                                 "stop": str | [str, ...], "n": 1, "stream": false, "seed": null, "echo": false,
                                 "logprobs": null | 0..5, "top_k": 0, "repetition_penalty": 1.0}
    POST /v1/chat/completions   {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...],
                                 "max_tokens" (or "max_completion_tokens"): as many as fit, "temperature",
                                 "top_p", "stop", "n", "stream", "stream_options": {"include_usage": bool},
                                 "seed", "logprobs": false, "top_logprobs": 0..5, "top_k", "repetition_penalty"}
                                (top_k and repetition_penalty are extensions)

Both routes run the same engine and validation; they differ only in the JSON they answer with
(:class:`Completions`, :class:`Chat`). A chat's messages become one prompt through the chat
template stored with the tokenizer (:mod:`text2llm.chat`), decoded with the template's stop
strings; the reply starts at its first non-whitespace character.

``n``: choices per prompt, decoded as one batch (different samples from one seed); a list of
prompts is one batch too, prompt i's choices at indexes i*n .. i*n+n-1. ``logprobs``: OpenAI's
shapes (completions: ``tokens``, ``token_logprobs``, ``top_logprobs`` (the N best and the drawn
token), ``text_offset`` (characters from the start of the prompt); chat: ``content`` entries with
``token``, ``logprob``, ``bytes``, ``top_logprobs``), the log-softmax of the model's logits at each
step (before temperature, top-k/top-p and the repetition penalty), for the tokens of the
returned text; not with ``stream`` or ``echo`` (400).

``stream: true`` answers with server-sent events, one ``data: {json}`` per piece of text (chat:
``delta`` chunks, the first with the role), a last chunk per choice with its ``finish_reason``,
with ``stream_options.include_usage`` one more with the usage, and ``data: [DONE]``.

Limits keep one request from taking the server down: request body <= 1 MiB, at most 8 prompts
x choices, a prompt must fit the model's context (in tokens; 400 otherwise), ``max_tokens`` <=
the ``--max-tokens-limit``, at most 64 requests waiting (503 beyond). Bad requests get a 4xx JSON
error in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``, which the ``openai``
client raises as ``BadRequestError``, ``NotFoundError``, ...); the server keeps going.

Concurrency: each connection has its own thread (``ThreadingHTTPServer``); the model runs one
request at a time behind a lock (a FIFO queue in practice), so concurrent requests are all
answered, and a greedy request's text does not depend on what else is running.

Tensor parallel (``torchrun --nproc-per-node N -m text2llm serve CKPT --tp N``): every process
holds a slice of every weight, and all of them decode every request together. Rank 0 serves HTTP
as above (:class:`TensorParallelBackend`); before decoding a request it hands its prompt ids and
sampling settings to the other ranks with ``torch.distributed.broadcast_object_list``, and each
of them (:func:`follow`) runs the same decode over its slices, in step. A sampled request without
a seed gets one from rank 0, so every rank draws the same tokens. Ctrl-C or SIGTERM to rank 0
(or to torchrun, which passes it on) stops it and sends the others a stop message.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from text2llm.chat import CHAT_ROLES
from text2llm.errors import UserError
from text2llm.infer.decoding import Completion, SamplingParams, TokenLogprob, chat_prompt, complete, token_spans

MAX_BODY_BYTES = 1 << 20
MAX_PROMPTS = 8
MAX_STOP = 4
MAX_PENDING = 64
MAX_LOGPROBS = 5  # alternatives per token (completions' logprobs, chat's top_logprobs)
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

    def run(self, prompt_ids, params, on_text=None, **kw):
        """:func:`~text2llm.infer.decoding.complete` on ``prompt_ids`` (``kw``: logprobs, lstrip)."""
        with self.pending_lock:
            if self.pending >= MAX_PENDING:
                raise ApiError(503, f"server busy: {self.pending} requests waiting, try again later", type_="server_error")
            self.pending += 1
        try:
            with self.lock:
                return self.decode(prompt_ids, params, on_text, **kw)
        finally:
            with self.pending_lock:
                self.pending -= 1

    def decode(self, prompt_ids, params, on_text, **kw):
        """One request's decode (the caller holds the lock)."""
        return complete(self.engine, self.tok, [], params, learned_positions=self.learned_positions,
                        on_text=on_text, prompt_ids=prompt_ids, **kw)

    def keepalive(self) -> None:
        """Called by the server between requests (every half second)."""

    def close(self) -> None:
        """The server stopped."""


# ---- tensor parallel: every rank decodes every request -------------------------------------------

KEEPALIVE_S = 60.0  # an idle rank 0 pings the others: a collective waits at most the group's timeout (30 min)


def _broadcast(message):
    """Rank 0's ``message`` on every rank (``torch.distributed.broadcast_object_list``)."""
    import torch.distributed as tdist

    box = [message]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


class TensorParallelBackend(Backend):
    """Rank 0's backend under ``serve --tp N``: each request goes to every rank before rank 0
    decodes it, so all of them run the same decode (and its collectives) in step (:func:`follow`)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.last_message = time.monotonic()
        self.closed = False

    def _send(self, message) -> None:
        _broadcast(message)
        self.last_message = time.monotonic()

    def decode(self, prompt_ids, params, on_text, **kw):
        if self.closed:
            raise ApiError(503, "the server is stopping", type_="server_error")
        if params.temperature > 0 and params.seed is None:  # every rank must draw the same tokens
            params = dataclasses.replace(params, seed=secrets.randbits(63))
        # (logprobs stay on rank 0, which alone answers: the other ranks need what decides the tokens)
        self._send(("complete", prompt_ids, params, {"lstrip": kw.get("lstrip", False)}))
        lost: list[Exception] = []

        def deliver(row: int, piece: str) -> None:
            if not lost:  # a client gone mid-stream: finish the decode anyway, or the other ranks would wait
                try:
                    on_text(row, piece)
                except Exception as e:  # (BrokenPipeError, ...): raised once the decode is done
                    lost.append(e)

        done = super().decode(prompt_ids, params, deliver if on_text is not None else None, **kw)
        if lost:
            raise lost[0]
        return done

    def keepalive(self) -> None:
        if time.monotonic() - self.last_message > KEEPALIVE_S and self.lock.acquire(blocking=False):
            try:
                if not self.closed:
                    self._send(("ping",))
            finally:
                self.lock.release()

    def close(self) -> None:
        with self.lock:  # after the request being decoded, if any
            if not self.closed:
                self.closed = True
                self._send(None)


def follow(served) -> None:
    """Ranks 1..N-1 under ``serve --tp N``: decode every request rank 0 hands over, until its stop
    message. Signals are left to rank 0 (torchrun passes Ctrl-C and SIGTERM to every rank), which
    stops after the request in flight and then sends the stop message."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    backend = Backend.of(served)
    while (message := _broadcast(None)) is not None:
        if message[0] != "complete":  # a keep-alive ping
            continue
        _, prompt_ids, params, kw = message
        try:
            backend.decode(prompt_ids, params, None, **kw)
        except Exception:  # rank 0 meets the same error in the same place and answers it
            traceback.print_exc()


# ---- request parsing -----------------------------------------------------------------------------


@dataclass
class Request:
    """A validated request to either route: what to decode and how to answer it."""

    shape: type  # Completions or Chat: the response's JSON shape
    texts: list[str]  # one per prompt (completions' echo)
    ids: list[list[int]]  # one per prompt, BOS first
    params: SamplingParams
    n: int = 1  # choices per prompt: prompt i's are choices i*n .. i*n+n-1, decoded in one batch
    stream: bool = False
    echo: bool = False
    logprobs: int | None = None  # top alternatives per token; None = no logprobs
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage

    @property
    def rows(self) -> list[list[int]]:
        return [x for x in self.ids for _ in range(self.n)]


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


def _flag(body, key) -> bool:
    if not isinstance(body.get(key, False), bool):
        raise ApiError(400, f"'{key}' must be true or false", key)
    return body.get(key, False)


def _unsupported(body, allowed: dict) -> None:
    for key, want in allowed.items():
        if body.get(key, want) not in (want, None):
            raise ApiError(400, f"'{key}' is not supported (only {json.dumps(want)})", key)


def _common(body, shape, texts, ids, max_tokens, **kw) -> Request:
    """What both routes share: sampling, stop strings, seed, n, stream."""
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and 0 < len(s) <= 200 for s in stop):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ApiError(400, "'seed' must be a non-negative integer", "seed")
    n = _number(body, "n", 1, 1, MAX_PROMPTS, integer=True)
    if n * len(texts) > MAX_PROMPTS:
        raise ApiError(400, f"{len(texts)} prompts x n={n} choices: at most {MAX_PROMPTS} per request", "n")
    stream = _flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    if stream and kw.get("logprobs") is not None:
        raise ApiError(400, "'logprobs' with 'stream' is not supported (ask without streaming)", "logprobs")
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=_number(body, "top_k", 0, 0, 1_000_000, integer=True),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True),
        stop=tuple(stop), seed=seed,
    )
    return Request(shape, texts, ids, params, n, stream, include_usage=stream and options.get("include_usage", False), **kw)


def _fits(req: Request, backend: "Backend") -> Request:
    ctx = backend.engine.max_len
    for i, x in enumerate(req.ids):
        if len(x) >= ctx:
            what = "the conversation" if req.shape is Chat else f"prompt {i}"
            raise ApiError(400, f"{what} is {len(x)} tokens; this model's context is {ctx} tokens "
                                f"(prompt + at least 1 new token)", "messages" if req.shape is Chat else "prompt")
    return req


def parse_request(body, backend: "Backend", max_tokens_limit: int) -> Request:
    """Validate a /v1/completions body."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ApiError(400, "'prompt' is required: a string or a list of strings", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"'prompt' holds {len(prompts)} prompts; at most {MAX_PROMPTS} per request", "prompt")
    _unsupported(body, {"best_of": 1, "suffix": None})
    max_tokens = _number(body, "max_tokens", DEFAULT_MAX_TOKENS, 1, max_tokens_limit, integer=True)
    echo = _flag(body, "echo")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _number(body, "logprobs", 0, 0, MAX_LOGPROBS, integer=True)
        if echo:
            raise ApiError(400, "'logprobs' with 'echo' is not supported (the prompt's tokens are not scored)", "logprobs")
    if any(len(p) > 4 * MAX_BODY_BYTES for p in prompts):
        raise ApiError(400, "prompt too long", "prompt")
    tok = backend.tok
    ids = [[tok.bos_id] + tok.encode(p) for p in prompts]
    return _fits(_common(body, Completions, prompts, ids, max_tokens, echo=echo, logprobs=logprobs),
                 backend)


def _message(i: int, m) -> dict:
    """One chat message as {role, content: str}: content may be a string or a list of text parts;
    OpenAI's "developer" role is the system role."""
    if not isinstance(m, dict):
        raise ApiError(400, f"messages[{i}] must be an object with 'role' and 'content'", "messages")
    role = "system" if m.get("role") == "developer" else m.get("role")
    if role not in CHAT_ROLES:
        raise ApiError(400, f"messages[{i}].role: {json.dumps(m.get('role'))} is not one of "
                            f"{', '.join(CHAT_ROLES)}", "messages")
    content = m.get("content")
    if isinstance(content, list) and all(isinstance(c, dict) and c.get("type") == "text"
                                         and isinstance(c.get("text"), str) for c in content):
        content = "".join(c["text"] for c in content)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content: must be a string (or a list of text parts)", "messages")
    return {"role": role, "content": content}


def parse_chat(body, backend: "Backend", max_tokens_limit: int) -> Request:
    """Validate a /v1/chat/completions body: the conversation becomes one prompt through the
    tokenizer's chat template, decoded with its stop strings (:func:`~text2llm.infer.decoding.chat_prompt`)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' is required: a non-empty list of {role, content} objects", "messages")
    messages = [_message(i, m) for i, m in enumerate(messages)]
    for key in ("tools", "functions"):
        if body.get(key):
            raise ApiError(400, f"'{key}' is not supported (no tool calling)", key)
    # no max_tokens: as many as fit, up to the server's --max-tokens-limit
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, max_tokens_limit, 1, max_tokens_limit, integer=True)
    logprobs = None
    if _flag(body, "logprobs"):
        logprobs = _number(body, "top_logprobs", 0, 0, MAX_LOGPROBS, integer=True)
    elif body.get("top_logprobs") is not None:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    req = _common(body, Chat, [""], [], max_tokens, logprobs=logprobs)
    ids, req.params = chat_prompt(backend.tok, messages, req.params)  # + the template's stop strings
    req.ids = [ids]
    return _fits(req, backend)


# ---- response shapes -------------------------------------------------------------------------------


def _returned(tok, c: Completion, lstrip: bool) -> list[tuple[str, int, TokenLogprob]]:
    """(text, offset in the decoded continuation, logprob) of the tokens that made the returned
    text: a stop string's tokens after it are left out."""
    full = tok.decode(c.ids)
    end = len(c.text) + (len(full) - len(full.lstrip()) if lstrip else 0)
    return [(t, off, lp) for (t, off), lp in zip(token_spans(tok, c.ids), c.logprobs or []) if off < end]


class Completions:
    """/v1/completions: OpenAI's (legacy) text completion objects."""

    prefix, object, chunk_object, lstrip = "cmpl-", "text_completion", "text_completion", False

    @staticmethod
    def choice(i: int, text: str, finish: str | None = None, logprobs=None) -> dict:
        return {"text": text, "index": i, "logprobs": logprobs, "finish_reason": finish}

    chunk = choice

    @staticmethod
    def opening(i: int, req: Request) -> dict | None:
        return Completions.choice(i, req.texts[i // req.n], None) if req.echo else None

    @staticmethod
    def logprobs(tok, c: Completion, prompt: str) -> dict:
        """tokens, token_logprobs, top_logprobs (the N best and the drawn token, by text) and
        text_offset (characters from the start of the prompt)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for text, off, lp in _returned(tok, c, False):
            out["tokens"].append(text)
            out["token_logprobs"].append(lp.logprob)
            out["top_logprobs"].append({tok.decode([i]): v for i, v in lp.top + [(lp.id, lp.logprob)]})
            out["text_offset"].append(len(prompt) + off)
        return out


class Chat:
    """/v1/chat/completions: chat.completion objects, streamed as chat.completion.chunk deltas."""

    prefix, object, chunk_object, lstrip = "chatcmpl-", "chat.completion", "chat.completion.chunk", True

    @staticmethod
    def choice(i: int, text: str, finish: str | None = None, logprobs=None) -> dict:
        return {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish}

    @staticmethod
    def chunk(i: int, text: str, finish: str | None = None) -> dict:
        return {"index": i, "delta": {"content": text} if finish is None else {}, "logprobs": None,
                "finish_reason": finish}

    @staticmethod
    def opening(i: int, req: Request) -> dict:
        return {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    @staticmethod
    def logprobs(tok, c: Completion, prompt: str) -> dict:
        def entry(text: str, lp: float) -> dict:
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(text, lp.logprob), "top_logprobs": [entry(tok.decode([i]), v) for i, v in lp.top]}
                            for text, _, lp in _returned(tok, c, True)]}


ROUTES = {"/v1/completions": parse_request, "/v1/chat/completions": parse_chat}


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
            parse = ROUTES.get(self.path)
            if parse is None:
                raise ApiError(404, f"no route POST {self.path} (use /v1/completions or /v1/chat/completions)",
                               type_="not_found_error")
            req = parse(self._read_json(), self.server.backend, self.server.max_tokens_limit)
            head = {"id": f"{req.shape.prefix}{uuid.uuid4().hex[:24]}", "object": req.shape.object,
                    "created": int(time.time()), "model": self.server.backend.name}
            if req.stream:
                self._stream(req, head)
            else:
                self._complete(req, head)
        except ApiError as e:
            self._error(e)
        except UserError as e:
            self._error(ApiError(400, str(e)))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client went away or stalled; nothing to answer
        except Exception as e:  # a bug: answer 500, log it, keep serving
            traceback.print_exc()
            try:
                self._error(ApiError(500, f"internal error: {type(e).__name__}", type_="server_error"))
            except OSError:
                pass

    def do_PUT(self):
        self._error(ApiError(405, "method not allowed", type_="invalid_request_error"))

    do_DELETE = do_PATCH = do_PUT

    # -- completions and chat completions: one engine call, two JSON shapes
    def _usage(self, req: Request, done) -> dict:
        used = sum(len(x) for x in req.ids), sum(c.tokens for c in done)
        return {"prompt_tokens": used[0], "completion_tokens": used[1], "total_tokens": sum(used)}

    def _complete(self, req: Request, head: dict) -> None:
        shape, tok = req.shape, self.server.backend.tok
        done = self.server.backend.run(req.rows, req.params, logprobs=req.logprobs, lstrip=shape.lstrip)
        choices = []
        for i, c in enumerate(done):
            prompt = req.texts[i // req.n]
            lp = None if req.logprobs is None else shape.logprobs(tok, c, prompt)
            choices.append(shape.choice(i, (prompt if req.echo else "") + c.text, c.finish_reason, lp))
        self._json(200, {**head, "choices": choices, "usage": self._usage(req, done)})

    def _stream(self, req: Request, head: dict) -> None:
        shape = req.shape
        head = {**head, "object": shape.chunk_object}
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

        for i in range(len(req.rows)):
            if (first := shape.opening(i, req)) is not None:
                send({**head, "choices": [first]})
        try:
            done = self.server.backend.run(req.rows, req.params, lstrip=shape.lstrip,
                                           on_text=lambda i, s: send({**head, "choices": [shape.chunk(i, s)]}))
        except ApiError as e:  # e.g. busy: the headers are gone, so report it as an event
            send({"error": {"message": e.message, "type": e.type, "param": e.param, "code": None}})
        else:
            for i, c in enumerate(done):
                send({**head, "choices": [shape.chunk(i, "", c.finish_reason)]})
            if req.include_usage:
                send({**head, "choices": [], "usage": self._usage(req, done)})
        send("[DONE]")


class CompletionServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # the listen backlog: socketserver's default of 5 overflows when many clients connect at once
    # while the accept thread waits for the GIL (seen as connection resets on a loaded 2-core VM)
    request_queue_size = MAX_PENDING

    def __init__(self, addr, backend: Backend, max_tokens_limit: int, quiet: bool = False):
        super().__init__(addr, Handler)
        self.backend, self.max_tokens_limit, self.quiet = backend, max_tokens_limit, quiet

    def service_actions(self) -> None:  # serve_forever calls it every poll interval
        self.backend.keepalive()


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
    """``text2llm serve``: run until Ctrl-C (or SIGTERM, under ``--tp``). With ``served.tp`` > 1
    (torchrun, ``open_engine(tp=N)``) rank 0 serves and the other ranks :func:`follow` it."""
    tp = getattr(served, "tp", 1)
    if tp > 1:
        import torch.distributed as tdist

        if tdist.get_rank() != 0:
            return follow(served)
    backend = TensorParallelBackend.of(served) if tp > 1 else Backend.of(served)
    try:
        srv = make_server(backend, host, port, max_tokens_limit)
        h, p = srv.server_address[:2]
        if host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: listening on {host}: anyone who can reach this port can use the model "
                  "(there is no authentication)", file=sys.stderr)
        how = "Ctrl-C stops" if tp == 1 else f"rank 0 is pid {os.getpid()}; Ctrl-C or SIGTERM stops every rank"
        print(f"serving {backend.name} ({backend.kind}, context {backend.engine.max_len}) on http://{h}:{p}  "
              f"(POST /v1/completions and /v1/chat/completions, GET /health; {how})", flush=True)
        if tp > 1:  # stop serve_forever from a thread: an exception raised by a signal could split a broadcast
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: threading.Thread(target=srv.shutdown, daemon=True).start())
        try:
            srv.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            srv.server_close()
    finally:
        backend.close()
