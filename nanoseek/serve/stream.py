"""A streamed completion: server-sent events in OpenAI's chunk format."""

import json

from fastapi.responses import StreamingResponse

from nanoseek.serve.requests import token_usage
from nanoseek.serve.schemas import api_error
from nanoseek.serve.worker import next_event
from nanoseek.tokenizer import ThinkingStream


class EventStream(StreamingResponse):
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


async def chunks(job, rid, created, req, chat, dropped_turns):
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
        index, event = await next_event(None, job)
        if index == "error":
            yield f"data: {json.dumps(api_error(event).body())}\n\n"
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
        yield chunk([], token_usage(job.prompts, req.n, completion_tokens, dropped_turns))
    yield "data: [DONE]\n\n"
