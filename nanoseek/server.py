"""An OpenAI-compatible server over the engine, with continuous batching and a web chat at `/`.

One worker owns the engine: it admits new sequences between steps, runs a step, and hands each token to
the request that waits for it. `nanoseek serve` runs it in the main thread and the HTTP side in another:
torch's OpenMP threads belong to the thread that first ran parallel work (loading, compiling), and a second
thread running kernels makes a second team, which libgomp then wakes slowly (7.7-8.7x slower decoding on 2
cores). The HTTP side reserves engine slots before it queues work, so a request that finds every slot taken
gets 429 at once, and one that could never fit gets 400.

What one client can hold is bounded. `Guard`, a pure ASGI middleware (so disconnects still reach the
handlers), checks the Host header and the key and reads the body itself, refusing it once it passes the
size limit or its deadline, whatever its framing; `uvicorn_config` closes connections whose request head
does not arrive in time and caps how many are open. A request that fails, or whose client leaves,
hands back its slots (`Job.close`).
"""

import asyncio
import functools
import hmac
import ipaddress
import json
import os
import queue
import threading
import time
import uuid
from importlib import resources
from typing import Annotated, Literal

import h11
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from starlette.datastructures import Headers, QueryParams
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from nanoseek.engine import COMPILE, COMPILE_NOTE, Engine
from nanoseek.model import trained_context
from nanoseek.sampling import SamplingParams
from nanoseek.text import DEFAULT_REPETITION_STOP, MAX_PERIOD
from nanoseek.tokenizer import ConversationTooLong, ThinkingStream, split_thinking, trim_conversation

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier"}  # bookkeeping that changes no output


class APIError(Exception):
    def __init__(self, status, message, type_="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, close=False):
        """OpenAI's error JSON (ASCII, so any text echoed back encodes); `close` ends the connection too."""
        return Response(json.dumps(self.body()), status_code=self.status, media_type="application/json",
                        headers={"connection": "close"} if close else None)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def _api_error(exc):
    """The HTTP error for what the worker reported: bad input is the client's, anything else the server's."""
    if isinstance(exc, ValueError):
        return APIError(400, str(exc))
    return APIError(500, str(exc), "server_error")


# ----------------------------------------------------------------------------- request schemas


def _valid_unicode(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError("invalid_unicode", "not valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text = Field(max_length=1_000_000)
    reasoning_content: Text | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in (
    (400, "invalid JSON or Unicode, an unsupported field, a prompt and max_tokens over the context, more "
          "sequences than the server has slots, or a Host header this server does not answer to"),
    (401, "missing or wrong API key"), (404, "unknown model"), (408, "the request body did not arrive in time"),
    (413, "request body too large"), (422, "invalid fields"), (429, "every engine slot is taken"),
    (500, "generation failed; the server goes on serving"))}
STREAMABLE = {200: {"description": "a completion, or server-sent events of chunks when stream is true",
                    "content": {"application/json": {}, "text/event-stream": {}}}, **ERRORS}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")  # kept so that unsupported fields can be refused by name
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: Text | list[Text] | None = None
    max_tokens: int | None = Field(None, ge=1)
    repetition_stop: int = Field(DEFAULT_REPETITION_STOP, ge=0, description=(  # an extension of OpenAI's API
        f"end a choice with finish_reason 'repetition' once it ends in a block of up to {MAX_PERIOD} tokens "
        "repeated back to back over this many tokens; 0: off"))

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    trim_history: bool = Field(False, description=(  # an extension of OpenAI's API
        "drop the oldest turns (a user message and the replies after it; never a system message or the last user "
        "message) until the prompt leaves half of the context the model was trained on for the reply, and say how "
        "many in usage.dropped_turns; refused with context_length_exceeded when the system messages and the last "
        "user message alone fill that context. false: the messages are used whole, and refused when they fill "
        "the server's context"))


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text]

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if (isinstance(v, str) and not v) or (isinstance(v, list) and (not v or any(not p for p in v))):
            raise ValueError("prompt must be a non-empty string or a list of them")
        return v


# ----------------------------------------------------------------------------- the worker


class Job:
    """Sequences of one HTTP request: the worker pushes ("admitted", None), then (index, Event) into
    `events` (every event when streaming, else only the last of each sequence: each push wakes the event
    loop, which then competes with decoding for the cores), or ("error", exception). `close` hands back what
    the request took, once, however it ends."""

    def __init__(self, prompts, params, loop, worker, stream):
        self.prompts, self.params, self.loop, self.worker, self.stream = prompts, params, loop, worker, stream
        self.events: asyncio.Queue = asyncio.Queue()
        self.seq_ids: list[int] = []
        self.closed = False

    def push(self, item):
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def close(self):
        if not self.closed:
            self.closed = True
            self.worker.cancel(self)
            self.worker.release(len(self.prompts))


class Worker:
    def __init__(self, engine: Engine, thread=True):
        """thread: run in a thread of its own, started here; else the caller runs `run` where it likes."""
        self.engine = engine
        self.inbox: queue.Queue = queue.Queue()
        self.reserved = 0
        self.lock = threading.Lock()
        self.jobs: dict[int, tuple[Job, int]] = {}  # sequence id -> (job, index in job)
        if thread:
            threading.Thread(target=self.run, daemon=True, name="nanoseek-engine").start()

    def reserve(self, n):
        with self.lock:
            if self.reserved + n > self.engine.max_batch:
                return False
            self.reserved += n
            return True

    def release(self, n):
        with self.lock:
            self.reserved -= n

    def submit(self, job):
        self.inbox.put(("add", job))

    def cancel(self, job):
        self.inbox.put(("abort", job))

    @property
    def load(self):
        return {"running": len(self.engine.running), "reserved": self.reserved, "free": len(self.engine.free),
                "slots": self.engine.max_batch}

    def run(self, running=lambda: True):
        """Admit, abort and step, for as long as running() (checked at least every second while idle)."""
        while running():
            try:
                kind, job = self.inbox.get(timeout=1.0 if self.engine.idle else 0)
            except queue.Empty:
                if self.engine.idle:
                    continue
                kind = None
            if kind == "add":
                try:
                    seqs = self.engine.add(job.prompts, job.params)  # all or nothing
                except Exception as e:  # the request learns why; the engine goes on
                    job.push(("error", e))
                    continue
                for i, seq in enumerate(seqs):
                    job.seq_ids.append(seq.id)
                    self.jobs[seq.id] = (job, i)
                job.push(("admitted", None))
                continue
            if kind == "abort":
                for sid in job.seq_ids:
                    self.engine.abort(sid)
                    self.jobs.pop(sid, None)
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - fail the running requests, keep serving the next ones
                for sid, (job, _) in list(self.jobs.items()):
                    job.push(("error", RuntimeError(f"generation failed: {e}")))
                    self.engine.abort(sid)
                self.jobs.clear()
                continue
            for event in events:
                job, index = self.jobs.get(event.seq.id, (None, None))
                if job is not None and (job.stream or event.finished):
                    job.push((index, event))
                if event.finished:
                    self.jobs.pop(event.seq.id, None)


# ----------------------------------------------------------------------------- limits


class Guard:
    """Pure ASGI middleware: the Host allow-list, the API key, and the body, which it reads whole here
    (at most `max_body_bytes`, within `body_timeout` seconds, whatever the framing) and hands on."""

    def __init__(self, app, api_key, hosts, max_body_bytes, body_timeout):
        self.app, self.api_key, self.hosts = app, api_key, hosts
        self.max_body_bytes, self.body_timeout = max_body_bytes, body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self._check(scope)
            body = await self._read_body(receive)
        except APIError as e:  # the body may be unread: close the connection rather than drain it
            return await e.response(close=True)(scope, receive, send)
        if body is not None:  # None: the client left while sending
            await self.app(scope, _replay(body, receive), send)

    def _check(self, scope):
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if self.hosts is not None and _host_name(host) not in self.hosts:
            raise APIError(400, f"this server answers to the hosts {', '.join(self.hosts)}, not {host!r} (a "
                                "server on loopback without an API key refuses other names, against DNS "
                                "rebinding; start it with --api-key to serve them)", code="invalid_host")
        if self.api_key and scope["path"] != "/health":
            scheme, _, token = headers.get("authorization", "").partition(" ")
            query = QueryParams(scope["query_string"])
            if scope["path"] == "/" and "api_key" in query:  # the page: open /?api_key=KEY
                scheme, token = "bearer", query["api_key"]
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                               "authentication_error", code="invalid_api_key")
        if "transfer-encoding" in headers and "content-length" in headers:
            raise APIError(400, "the request has both Content-Length and Transfer-Encoding; send one of them")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            raise APIError(413, f"the request body is larger than {self.max_body_bytes} bytes")

    async def _read_body(self, receive):
        try:
            return await asyncio.wait_for(self._read(receive), self.body_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.body_timeout:g} s; "
                                "send it whole, without pauses", code="body_timeout") from None

    async def _read(self, receive):
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                raise APIError(413, f"the request body is larger than {self.max_body_bytes} bytes")
        return bytes(body)


def _replay(body, receive):
    """An ASGI receive that gives the body read by the guard, then whatever comes next (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay


def _host_name(host):
    """The name in a Host header without its port: 'localhost:8000' -> 'localhost', '[::1]:80' -> '[::1]'."""
    host = host.lower()
    return host if host.endswith("]") else host.rsplit(":", 1)[0]


def allowed_hosts(bind, api_key):
    """Host names a server bound to `bind` answers to; None for any. On loopback without a key, only
    loopback names: a web page can point its own DNS name at 127.0.0.1, but not send Host: localhost."""
    if api_key:
        return None
    try:
        loopback = bind == "localhost" or ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return None
    return tuple(dict.fromkeys(LOOPBACK_HOSTS + (f"[{bind}]" if ":" in bind else bind,)))


class HeaderDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for each request head: a connection that has not sent a
    whole request line and headers within `header_timeout` seconds of opening (or of its last response)
    is closed, so half-sent requests cannot hold connections."""

    def __init__(self, *args, header_timeout=10.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout, self.header_deadline = header_timeout, None

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self):
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc):
        if self.header_deadline is not None:
            self.header_deadline.cancel()
        super().connection_lost(exc)

    def _arm(self):
        if self.header_deadline is not None:
            self.header_deadline.cancel()
        self.header_deadline = self.loop.call_later(self.header_timeout, self._head_late)

    def _head_late(self):
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app, host="127.0.0.1", port=8000, header_timeout=10.0, max_connections=256):
    """uvicorn settings that bound what slow or idle clients hold: a request head within `header_timeout`
    seconds and 16 KiB, idle keep-alive connections closed after 5 s, at most `max_connections`
    connections or requests at once (more get 503)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning",
                          http=functools.partial(HeaderDeadlineH11, header_timeout=header_timeout),
                          timeout_keep_alive=5, limit_concurrency=max_connections,
                          h11_max_incomplete_event_size=16 * 1024)


# ----------------------------------------------------------------------------- the app


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_body_bytes=1 << 20,
               host="127.0.0.1", body_timeout=30.0, engine_thread=True):
    """The API over `engine`. `host` is the address the server is bound to: on loopback without an
    API key, requests must name a loopback host (see `allowed_hosts`). engine_thread: the engine's worker
    runs in a thread of its own; else the caller runs app.state.worker.run (serve: in the main thread)."""
    app = FastAPI(title="nanoseek", version="0.1.0", description="OpenAI-compatible API of a nanoseek model")
    worker = Worker(engine, thread=engine_thread)
    tokenizer = engine.tokenizer
    context = engine.max_len
    trained = min(trained_context(engine.model.config), context)  # what trim_history keeps a conversation within
    token_bytes = tokenizer.max_token_bytes
    app.state.worker = worker
    app.add_middleware(Guard, api_key=api_key, hosts=allowed_hosts(host, api_key), max_body_bytes=max_body_bytes,
                       body_timeout=body_timeout)

    @app.exception_handler(APIError)
    async def _api_error_response(request, exc: APIError):
        return exc.response()

    @app.exception_handler(ClientGone)
    async def _client_gone(request, exc):
        return Response(status_code=499)  # nobody is listening; the slots are already free

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" or tuple(e.get("loc", ())) == ("body",) for e in errors):
            return APIError(400, "the request body is not valid JSON: send a JSON object "
                                 "with Content-Type: application/json").response()
        unicode = [e for e in errors if e.get("type") in ("invalid_unicode", "string_unicode")]
        first = (unicode or errors or [{}])[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:] if "[" not in str(p)) or None  # no union tags
        if unicode:
            return APIError(400, f"invalid request: {where} is not valid Unicode (it has a lone surrogate); "
                                 "send text that encodes as UTF-8", param=where).response()
        return APIError(422, f"invalid request: {where}: {first.get('msg', 'invalid value')}", param=where).response()

    @app.get("/health")
    async def health():
        return {"status": "ok", **worker.load}

    @app.get("/v1/models", responses=ERRORS)
    async def models():
        return {"object": "list", "data": [_model_card(model_name)]}

    @app.get("/v1/models/{name}", responses=ERRORS)
    async def model(name: str):
        _check_model(name, model_name)
        return _model_card(model_name)

    @app.get("/", response_class=HTMLResponse, responses={401: ERRORS[401]})
    async def page():
        return HTMLResponse(resources.files("nanoseek.web").joinpath("index.html").read_text())

    @app.post("/v1/chat/completions", responses=STREAMABLE)
    async def chat(req: ChatRequest, request: Request):
        _check_request(req, model_name)
        messages, dropped = [m.model_dump(exclude_none=True) for m in req.messages], None
        if req.trim_history:  # trimming reads no more text than fits the trained context
            messages, dropped = await asyncio.to_thread(_trim, tokenizer, messages, trained)
        else:
            _check_size([m.content + (m.reasoning_content or "") for m in req.messages], context, token_bytes,
                        "messages")
        prompt, _ = await asyncio.to_thread(tokenizer.render_chat, messages, add_generation_prompt=True)
        params = _params(req, req.max_completion_tokens or req.max_tokens, len(prompt), context, "messages")
        return await _serve(request, worker, [prompt] * req.n, params, req, chat=True, dropped_turns=dropped)

    @app.post("/v1/completions", responses=STREAMABLE)
    async def completions(req: CompletionRequest, request: Request):
        _check_request(req, model_name)
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        for text in texts:
            _check_size([text], context, token_bytes, "prompt")
        prompts = await asyncio.to_thread(lambda: [tokenizer.encode_prompt(t) for t in texts])
        params = []
        for p in prompts:
            params += _params(req, req.max_tokens, len(p), context, "prompt")
        prompts = [p for p in prompts for _ in range(req.n)]
        return await _serve(request, worker, prompts, params, req, chat=False)

    default_openapi = app.openapi

    def openapi():  # the one model id this server knows, so clients and fuzzers can reach past the 404
        schema = default_openapi()
        for name in ("ChatRequest", "CompletionRequest"):
            schema["components"]["schemas"][name]["properties"]["model"]["enum"] = [model_name]
        return schema

    app.openapi = openapi
    return app


def _model_card(name):
    return {"id": name, "object": "model", "created": 0, "owned_by": "nanoseek"}


def _check_model(name, served):
    if name != served:
        raise APIError(404, f"model {name!r} does not exist; this server serves {served!r}", code="model_not_found",
                       param="model")


def _check_request(req, served):
    """The model is ours and no field asks for something this server does not do (null, false, 0 and
    empty values are the same as leaving a field out)."""
    _check_model(req.model, served)
    unsupported = sorted(k for k, v in (req.model_extra or {}).items()
                         if k not in IGNORED_FIELDS and v not in (None, False, 0, "", [], {}))
    if unsupported:
        raise APIError(400, f"this server does not support {', '.join(map(repr, unsupported))}; leave "
                            f"{'it' if len(unsupported) == 1 else 'them'} out", param=unsupported[0],
                       code="unsupported_parameter")


def _trim(tokenizer, messages, trained):
    """trim_conversation for trim_history: a conversation that cannot fit is refused as one over the context."""
    try:
        return trim_conversation(tokenizer, messages, trained)
    except ConversationTooLong as e:
        raise APIError(400, f"{e}, the context the model was trained on; shorten them",
                       code="context_length_exceeded", param="messages") from None


def _check_size(texts, context, token_bytes, field):
    """Refuse text too long for the context before tokenizing it (which costs far more memory than the
    text): a token covers at most `token_bytes` bytes."""
    size = sum(len(t.encode()) for t in texts)
    if size > context * token_bytes:
        raise APIError(400, f"the prompt is {size} bytes, more than the context of {context} tokens can hold "
                            f"(a token covers at most {token_bytes} bytes); shorten it",
                       code="context_length_exceeded", param=field)


def _params(req, max_tokens, prompt_len, context, field):
    """One SamplingParams per choice; refuses a prompt and max_tokens that do not fit the context. The
    prompt came in `field`. Choice i samples with seed + i, kept within the generator's 64 bits."""
    if prompt_len >= context:
        raise APIError(400, f"the prompt has {prompt_len} tokens but the context holds {context}; shorten it",
                       code="context_length_exceeded", param=field)
    if max_tokens is None:
        max_tokens = context - prompt_len
    elif prompt_len + max_tokens > context:
        raise APIError(400, f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) is "
                            f"{prompt_len + max_tokens} tokens, over the context of {context}; lower max_tokens "
                            f"to at most {context - prompt_len}", code="context_length_exceeded", param="max_tokens")
    return [SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                           stop=tuple(req.stop or ()), seed=None if req.seed is None else (req.seed + i) % 2**64,
                           repetition_stop=req.repetition_stop)
            for i in range(req.n)]


async def _serve(request, worker: Worker, prompts, params, req, chat, dropped_turns=None):
    """The response: a completion, or a stream of chunks. dropped_turns: how many turns trim_history dropped
    (None: it was not asked for), reported in usage."""
    job = await _admit(request, worker, prompts, params, req.stream)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if req.stream:
        return _Stream(_stream(job, rid, created, req, chat, dropped_turns), job)
    try:
        finals = await _collect(request, job)
    finally:
        job.close()
    choices, completion_tokens = [], 0
    for i, seq in enumerate(finals):
        completion_tokens += len(seq.tokens)
        if chat:
            reasoning, answer = split_thinking(seq.text)
            message = {"role": "assistant", "content": answer, "reasoning_content": reasoning}
            choices.append({"index": i, "message": message, "finish_reason": seq.finish_reason, "logprobs": None})
        else:
            choices.append({"index": i, "text": seq.text, "finish_reason": seq.finish_reason, "logprobs": None})
    return {
        "id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
        "model": req.model, "choices": choices, "usage": _usage(prompts, req.n, completion_tokens, dropped_turns),
    }


def _usage(prompts, n, completion_tokens, dropped_turns):
    """OpenAI's usage (each distinct prompt counted once, not once per choice), with dropped_turns when
    trim_history was asked for."""
    prompt_tokens = sum(len(p) for p in prompts[:: max(1, n)])
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    return usage if dropped_turns is None else {**usage, "dropped_turns": dropped_turns}


async def _admit(request, worker: Worker, prompts, params, stream):
    """Reserve slots, queue the job and wait until the engine has admitted it; on any failure, what was
    taken is handed back before the error goes out."""
    n, slots = len(prompts), worker.engine.max_batch
    if n > slots:
        raise APIError(400, f"this request needs {n} sequences (n times the prompts) but the server decodes at "
                            f"most {slots} at once; lower n or send fewer prompts", param="n")
    if not worker.reserve(n):
        raise APIError(429, f"the server is at capacity ({slots} sequences); retry shortly",
                       "rate_limit_error", code="server_busy")
    job = Job(prompts, params, asyncio.get_running_loop(), worker, stream)
    worker.submit(job)
    try:
        kind, error = await _next_event(request, job)
    except BaseException:
        job.close()
        raise
    if kind == "error":
        job.close()
        raise _api_error(error)
    return job


async def _next_event(request, job):
    """The next worker event; raises ClientGone once the client has gone. Streaming responses pass
    request=None: there Starlette itself cancels the generator when the client disconnects."""
    if request is None:
        return await job.events.get()
    while not await request.is_disconnected():  # checked before every event: they may never pause
        try:
            return await asyncio.wait_for(job.events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            pass
    raise ClientGone()


async def _collect(request, job):
    finals = [None] * len(job.prompts)
    while any(f is None for f in finals):
        index, event = await _next_event(request, job)
        if index == "error":
            raise _api_error(event)
        if event.finished:
            finals[index] = event.seq
    return finals


class _Stream(StreamingResponse):
    """Server-sent events that close the job however the response ends, even when the client left
    before the first event (Starlette then never starts the generator, so its own cleanup never runs)."""

    def __init__(self, events, job):
        super().__init__(events, media_type="text/event-stream")
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.close()


async def _stream(job, rid, created, req, chat, dropped_turns):
    """Server-sent events in OpenAI's chunk format; thinking goes to delta.reasoning_content. An error
    comes as an event typed by its cause, then [DONE]. Usage, asked for with stream_options, comes last."""
    n = len(job.prompts)
    kind = "chat.completion.chunk" if chat else "text_completion"
    thinking = [ThinkingStream() for _ in range(n)]
    finished, completion_tokens = 0, 0

    def chunk(choices, usage=None):
        body = {"id": rid, "object": kind, "created": created, "model": req.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    if chat:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                     for i in range(n)])
    while finished < n:
        index, event = await _next_event(None, job)
        if index == "error":
            yield f"data: {json.dumps(_api_error(event).body())}\n\n"
            break
        finish = event.seq.finish_reason if event.finished else None
        if event.finished:
            finished += 1
            completion_tokens += len(event.seq.tokens)
        if not chat:
            yield chunk([{"index": index, "text": event.text, "finish_reason": finish, "logprobs": None}])
            continue
        reasoning, answer = thinking[index].add(event.text)
        delta = {k: v for k, v in (("reasoning_content", reasoning), ("content", answer)) if v}
        if delta or finish:
            yield chunk([{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}])
    if finished == n and req.stream_options and req.stream_options.include_usage:
        yield chunk([], _usage(job.prompts, req.n, completion_tokens, dropped_turns))
    yield "data: [DONE]\n\n"


def serve(path, host="127.0.0.1", port=8000, api_key=None, max_batch=16, model_name=None, device=None,
          threads=None):
    """The API and the web chat until interrupted: HTTP in a thread, the engine in this (the main) one."""
    import uvicorn

    from nanoseek.checkpoint import load
    from nanoseek.device import policy

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1 (got {threads})")
        torch.set_num_threads(threads)
    model, tokenizer = load(path, policy(device).device)
    if tokenizer is None:
        raise ValueError(f"{path} has no tokenizer; serve a checkpoint made by nanoseek")
    if COMPILE:
        print(COMPILE_NOTE)
    engine = Engine(model, tokenizer, max_batch=max_batch, ahead_of_time=True)  # a lone request's steps: packages
    name = model_name or os.path.basename(os.path.normpath(path))
    app = create_app(engine, name, api_key=api_key, host=host, engine_thread=False)
    server = uvicorn.Server(uvicorn_config(app, host, port))
    print(f"serving {name} on http://{host}:{port} (OpenAI API at /v1, chat page at /), decoding with "
          f"{torch.get_num_threads()} threads", flush=True)
    http = threading.Thread(target=server.run, name="nanoseek-http")
    http.start()
    try:
        app.state.worker.run(running=http.is_alive)  # returns if the HTTP side stops (a port in use)
    finally:
        server.should_exit = True
        http.join()
    if not server.started:
        raise RuntimeError(f"could not listen on {host}:{port} (see above): is another server on that port?")
