"""An OpenAI-compatible server over the engine, with continuous batching and a web chat at `/`.

One worker thread owns the engine: it admits new sequences between steps, runs a step, and hands each
token to the request that waits for it. The HTTP side reserves engine slots before it queues work,
so a request that finds every slot taken gets 429 at once.
"""

import asyncio
import hmac
import json
import os
import queue
import threading
import time
import uuid
from importlib import resources
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.engine import Engine, SamplingParams

END_THINK = "</think>"


class APIError(Exception):
    def __init__(self, status, message, type_="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self):
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# ----------------------------------------------------------------------------- request schemas


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=1_000_000)
    reasoning_content: str | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in (
    (400, "invalid JSON, or a prompt and max_tokens over the context"), (401, "missing or wrong API key"),
    (404, "unknown model"), (413, "request body too large"), (422, "invalid fields"),
    (429, "every engine slot is taken"), (500, "generation failed; the server goes on serving"))}
STREAMABLE = {200: {"description": "a completion, or server-sent events of chunks when stream is true",
                    "content": {"application/json": {}, "text/event-stream": {}}}, **ERRORS}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(None, ge=1)

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


class CompletionRequest(SamplingFields):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if (isinstance(v, str) and not v) or (isinstance(v, list) and (not v or any(not p for p in v))):
            raise ValueError("prompt must be a non-empty string or a list of them")
        return v


# ----------------------------------------------------------------------------- the worker


class Job:
    """Sequences of one HTTP request: the worker pushes (index, Event) into `events`."""

    def __init__(self, prompts, params, loop):
        self.prompts, self.params, self.loop = prompts, params, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.seq_ids: list[int] = []

    def push(self, item):
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Worker:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.inbox: queue.Queue = queue.Queue()
        self.reserved = 0
        self.lock = threading.Lock()
        self.jobs: dict[int, tuple[Job, int]] = {}  # sequence id -> (job, index in job)
        self.thread = threading.Thread(target=self._run, daemon=True, name="nanoseek-engine")
        self.thread.start()

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
        return {"running": len(self.engine.running), "reserved": self.reserved, "slots": self.engine.max_batch}

    def _run(self):
        while True:
            try:
                kind, job = self.inbox.get(timeout=None if self.engine.idle else 0)
            except queue.Empty:
                kind = None
            if kind == "add":
                try:
                    for i, seq in enumerate(self.engine.add(job.prompts, job.params)):
                        job.seq_ids.append(seq.id)
                        self.jobs[seq.id] = (job, i)
                except Exception as e:  # the request learns why; the engine goes on
                    job.push(("error", e))
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
                if job is not None:
                    job.push((index, event))
                    if event.finished:
                        self.jobs.pop(event.seq.id, None)


# ----------------------------------------------------------------------------- the app


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_body_bytes=1 << 20):
    app = FastAPI(title="nanoseek", version="0.1.0", description="OpenAI-compatible API of a nanoseek model")
    worker = Worker(engine)
    tokenizer = engine.tokenizer
    context = engine.max_len
    app.state.worker = worker

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" or tuple(e.get("loc", ())) == ("body",) for e in errors):
            return APIError(400, "the request body is not valid JSON: send a JSON object "
                                 "with Content-Type: application/json").response()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return APIError(422, f"invalid request: {where}: {first.get('msg', 'invalid value')}", param=where).response()

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            return APIError(413, f"the request body is larger than {max_body_bytes} bytes").response()
        if api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if request.url.path == "/" and "api_key" in request.query_params:  # the page: open /?api_key=KEY
                given = "Bearer " + request.query_params["api_key"]
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                                "authentication_error", code="invalid_api_key").response()
        return await call_next(request)

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
        _check_model(req.model, model_name)
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        prompt, _ = tokenizer.render_chat(messages, add_generation_prompt=True)
        max_tokens = req.max_completion_tokens or req.max_tokens
        params = _params(req, max_tokens, len(prompt), context)
        return await _serve(request, worker, [prompt] * req.n, params, req, chat=True)

    @app.post("/v1/completions", responses=STREAMABLE)
    async def completions(req: CompletionRequest, request: Request):
        _check_model(req.model, model_name)
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        prompts = [[tokenizer.bos_id] + tokenizer.encode(t) for t in texts]
        params = []
        for p in prompts:
            params += _params(req, req.max_tokens, len(p), context)
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


def _params(req, max_tokens, prompt_len, context):
    """One SamplingParams per choice; refuses a prompt and max_tokens that do not fit the context."""
    if prompt_len >= context:
        raise APIError(400, f"the prompt has {prompt_len} tokens but the context holds {context}; shorten it",
                       code="context_length_exceeded", param="messages")
    if max_tokens is None:
        max_tokens = context - prompt_len
    elif prompt_len + max_tokens > context:
        raise APIError(400, f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) is "
                            f"{prompt_len + max_tokens} tokens, over the context of {context}; lower max_tokens "
                            f"to at most {context - prompt_len}", code="context_length_exceeded", param="max_tokens")
    return [SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                           stop=tuple(req.stop or ()), seed=None if req.seed is None else req.seed + i)
            for i in range(req.n)]


def split_reasoning(text):
    """(reasoning, answer) of a completion that began inside <think>."""
    if END_THINK in text:
        reasoning, answer = text.split(END_THINK, 1)
        return reasoning.strip("\n"), answer.lstrip("\n")
    return text.strip("\n"), ""


async def _serve(request, worker: Worker, prompts, params, req, chat):
    n = len(prompts)
    if not worker.reserve(n):
        raise APIError(429, f"the server is at capacity ({worker.engine.max_batch} sequences); retry shortly",
                       "rate_limit_error", code="server_busy")
    job = Job(prompts, params, asyncio.get_running_loop())
    worker.submit(job)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if req.stream:
        return StreamingResponse(_stream(request, worker, job, n, rid, created, req, chat),
                                 media_type="text/event-stream")
    try:
        finals = await _collect(request, job, n)
    except ConnectionError:
        return Response(status_code=499)  # nobody is listening; the slots are already free
    finally:
        worker.cancel(job)
        worker.release(n)
    choices, completion_tokens = [], 0
    for i, seq in enumerate(finals):
        completion_tokens += len(seq.tokens)
        if chat:
            reasoning, answer = split_reasoning(seq.text)
            message = {"role": "assistant", "content": answer, "reasoning_content": reasoning}
            choices.append({"index": i, "message": message, "finish_reason": seq.finish_reason, "logprobs": None})
        else:
            choices.append({"index": i, "text": seq.text, "finish_reason": seq.finish_reason, "logprobs": None})
    prompt_tokens = sum(len(p) for p in prompts[:: max(1, req.n)])
    return {
        "id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
        "model": req.model, "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


async def _next_event(request, job):
    """The next worker event; raises ConnectionError once the client has gone. Streaming responses pass
    request=None: there Starlette itself cancels the generator when the client disconnects."""
    if request is None:
        return await job.events.get()
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ConnectionError("client disconnected") from None


async def _collect(request, job, n):
    finals = [None] * n
    while any(f is None for f in finals):
        index, event = await _next_event(request, job)
        if index == "error":
            raise APIError(400 if isinstance(event, ValueError) else 500, str(event),
                           "invalid_request_error" if isinstance(event, ValueError) else "server_error")
        if event.finished:
            finals[index] = event.seq
    return finals


async def _stream(request, worker, job, n, rid, created, req, chat):
    """Server-sent events in OpenAI's chunk format; thinking goes to delta.reasoning_content."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    state = [{"text": "", "answering": False, "answer_started": False} for _ in range(n)]
    finished, completion_tokens = 0, 0

    def chunk(choices, usage=None):
        body = {"id": rid, "object": kind, "created": created, "model": req.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    try:
        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                         for i in range(n)])
        while finished < n:
            index, event = await _next_event(None, job)
            if index == "error":
                yield f"data: {json.dumps({'error': {'message': str(event), 'type': 'invalid_request_error'}})}\n\n"
                return
            finish = event.seq.finish_reason if event.finished else None
            if event.finished:
                finished += 1
                completion_tokens += len(event.seq.tokens)
            if not chat:
                yield chunk([{"index": index, "text": event.text, "finish_reason": finish, "logprobs": None}])
                continue
            delta = _route_delta(state[index], event.text)
            if delta or finish:
                yield chunk([{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}])
        if req.stream_options and req.stream_options.include_usage:
            prompt_tokens = sum(len(p) for p in job.prompts[:: max(1, req.n)])
            yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens})
        yield "data: [DONE]\n\n"
    except (ConnectionError, asyncio.CancelledError):
        pass  # the client went away: the finally below frees its slots
    finally:
        worker.cancel(job)
        worker.release(n)


def _route_delta(state, text):
    """Split streamed text between reasoning_content (before </think>) and content (after it)."""
    delta = {}
    if not state["answering"]:
        combined = state["text"] + text
        if END_THINK in combined:
            before, after = combined.split(END_THINK, 1)
            reasoning = before[len(state["text"]) :] if len(before) >= len(state["text"]) else ""
            if reasoning:
                delta["reasoning_content"] = reasoning
            state["answering"], text = True, after
        else:
            state["text"] = combined
            return {"reasoning_content": text} if text else {}
    if not state["answer_started"]:
        text = text.lstrip("\n")
        state["answer_started"] = bool(text)
    if text:
        delta["content"] = text
    return delta


def serve(path, host="127.0.0.1", port=8000, api_key=None, max_batch=16, model_name=None, device=None):
    import uvicorn

    from nanoseek.checkpoint import load
    from nanoseek.device import policy

    model, tokenizer = load(path, policy(device).device)
    if tokenizer is None:
        raise ValueError(f"{path} has no tokenizer; serve a checkpoint made by nanoseek")
    engine = Engine(model, tokenizer, max_batch=max_batch)
    name = model_name or os.path.basename(os.path.normpath(path))
    app = create_app(engine, name, api_key=api_key)
    print(f"serving {name} on http://{host}:{port} (OpenAI API at /v1, chat page at /)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
