"""The app: `create_app` puts the routes over a worker of the engine behind the guard, and `serve` runs it with
uvicorn, HTTP in a thread and the engine in the main one."""

import os
import threading
import time
import uuid
from importlib import resources

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.engine import COMPILE, COMPILE_NOTE, Engine
from nanoseek.model import trained_context
from nanoseek.serve.guard import Guard, allowed_hosts, uvicorn_config
from nanoseek.serve.requests import chat_prompt, check_model, check_request, completion_prompts, token_usage
from nanoseek.serve.schemas import ERRORS, STREAMABLE, APIError, ChatRequest, ClientGone, CompletionRequest
from nanoseek.serve.stream import EventStream, chunks
from nanoseek.serve.worker import Worker, admit, collect
from nanoseek.tokenizer import split_thinking


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_body_bytes=1 << 20,
               host="127.0.0.1", body_timeout=30.0, engine_thread=True):
    """The API over `engine`. `host` is the address the server is bound to: on loopback without an
    API key, requests must name a loopback host (see `allowed_hosts`). engine_thread: the engine's worker
    runs in a thread of its own; else the caller runs app.state.worker.run (serve: in the main thread)."""
    app = FastAPI(title="nanoseek", version="0.1.0", description="OpenAI-compatible API of a nanoseek model",
                  exception_handlers=_ERROR_HANDLERS)
    worker = Worker(engine, thread=engine_thread)
    tokenizer = engine.tokenizer
    context = engine.max_len
    trained = min(trained_context(engine.model.config), context)  # what trim_history keeps a conversation within
    token_bytes = tokenizer.max_token_bytes
    app.state.worker = worker
    app.add_middleware(Guard, api_key=api_key, hosts=allowed_hosts(host, api_key), max_body_bytes=max_body_bytes,
                       body_timeout=body_timeout)

    @app.get("/health")
    async def health():
        return {"status": "ok", **worker.load}

    @app.get("/v1/models", responses=ERRORS)
    async def models():
        return {"object": "list", "data": [_model_card(model_name)]}

    @app.get("/v1/models/{name}", responses=ERRORS)
    async def model(name: str):
        check_model(name, model_name)
        return _model_card(model_name)

    @app.get("/", response_class=HTMLResponse, responses={401: ERRORS[401]})
    async def page():
        return HTMLResponse(resources.files("nanoseek.web").joinpath("index.html").read_text())

    @app.post("/v1/chat/completions", responses=STREAMABLE)
    async def chat(req: ChatRequest, request: Request):
        check_request(req, model_name)
        prompt, params, dropped = await chat_prompt(req, tokenizer, context, trained, token_bytes)
        return await _respond(request, worker, [prompt] * req.n, params, req, chat=True, dropped_turns=dropped)

    @app.post("/v1/completions", responses=STREAMABLE)
    async def completions(req: CompletionRequest, request: Request):
        check_request(req, model_name)
        prompts, params = await completion_prompts(req, tokenizer, context, token_bytes)
        return await _respond(request, worker, prompts, params, req, chat=False)

    _name_the_model(app, model_name)
    return app


def _model_card(name):
    return {"id": name, "object": "model", "created": 0, "owned_by": "nanoseek"}


def _name_the_model(app, model_name):
    """The OpenAPI schema, with the one model id this server knows, so clients and fuzzers can reach past the 404."""
    default_openapi = app.openapi

    def openapi():
        schema = default_openapi()
        for name in ("ChatRequest", "CompletionRequest"):
            schema["components"]["schemas"][name]["properties"]["model"]["enum"] = [model_name]
        return schema

    app.openapi = openapi


async def _api_error_response(request, exc: APIError):
    return exc.response()


async def _client_gone(request, exc):
    return Response(status_code=499)  # nobody is listening; the slots are already free


async def _http_error(request, exc: StarletteHTTPException):
    return APIError(exc.status_code, str(exc.detail)).response()


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


_ERROR_HANDLERS = {APIError: _api_error_response, ClientGone: _client_gone, StarletteHTTPException: _http_error,
                   RequestValidationError: _invalid}


async def _respond(request, worker: Worker, prompts, params, req, chat, dropped_turns=None):
    """The response: a completion, or a stream of chunks. dropped_turns: how many turns trim_history dropped
    (None: it was not asked for), reported in usage."""
    job = await admit(request, worker, prompts, params, req.stream)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if req.stream:
        return EventStream(chunks(job, rid, created, req, chat, dropped_turns), job)
    try:
        finals = await collect(request, job)
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
        "model": req.model, "choices": choices, "usage": token_usage(prompts, req.n, completion_tokens, dropped_turns),
    }


def serve(path, host="127.0.0.1", port=8000, api_key=None, max_batch=16, model_name=None, device=None,
          threads=None):
    """The API and the web chat until interrupted: HTTP in a thread, the engine in this (the main) one."""
    import uvicorn

    from nanoseek.checkpoint import load
    from nanoseek.device import choose_compute

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1 (got {threads})")
        torch.set_num_threads(threads)
    model, tokenizer = load(path, choose_compute(device).device)
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
