"""From a validated request to what the engine runs: the checks no schema makes (the model, unsupported
fields, text too long for the context), trim_history, the prompts and one SamplingParams a choice; and the
usage a response reports."""

import asyncio

from nanoseek.sampling import SamplingParams
from nanoseek.serve.schemas import APIError
from nanoseek.tokenizer import ConversationTooLong, trim_conversation

IGNORED_FIELDS = {"user", "metadata", "store", "service_tier"}  # bookkeeping that changes no output


def check_model(name, served):
    if name != served:
        raise APIError(404, f"model {name!r} does not exist; this server serves {served!r}", code="model_not_found",
                       param="model")


def check_request(req, served):
    """The model is ours and no field asks for something this server does not do (null, false, 0 and
    empty values are the same as leaving a field out)."""
    check_model(req.model, served)
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


async def chat_prompt(req, tokenizer, context, trained, token_bytes):
    """The prompt of a chat request, one SamplingParams a choice, and how many turns trim_history dropped
    (None: it was not asked for)."""
    messages, dropped = [m.model_dump(exclude_none=True) for m in req.messages], None
    if req.trim_history:  # trimming reads no more text than fits the trained context
        messages, dropped = await asyncio.to_thread(_trim, tokenizer, messages, trained)
    else:
        _check_size([m.content + (m.reasoning_content or "") for m in req.messages], context, token_bytes,
                    "messages")
    prompt, _ = await asyncio.to_thread(tokenizer.render_chat, messages, add_generation_prompt=True)
    params = _params(req, req.max_completion_tokens or req.max_tokens, len(prompt), context, "messages")
    return prompt, params, dropped


async def completion_prompts(req, tokenizer, context, token_bytes):
    """The prompts of a completion request, each repeated n times, and one SamplingParams a choice."""
    texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    for text in texts:
        _check_size([text], context, token_bytes, "prompt")
    prompts = await asyncio.to_thread(lambda: [tokenizer.encode_prompt(t) for t in texts])
    params = []
    for p in prompts:
        params += _params(req, req.max_tokens, len(p), context, "prompt")
    return [p for p in prompts for _ in range(req.n)], params


def token_usage(prompts, n, completion_tokens, dropped_turns):
    """OpenAI's usage (each distinct prompt counted once, not once per choice), with dropped_turns when
    trim_history was asked for."""
    prompt_tokens = sum(len(p) for p in prompts[:: max(1, n)])
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    return usage if dropped_turns is None else {**usage, "dropped_turns": dropped_turns}
