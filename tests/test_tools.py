"""The calculator tool run by the engine: a call the model writes gets its result as forced tokens, in one prefill
chunk, beside sequences that decode on, with speculation too; every consumer (chat, server, web page, rejection
sampling) shows or keeps it the same way; and transformers with a client loop gets the engine's tokens."""

import json
import math
from pathlib import Path

import openai
import pytest
import torch
from conftest import start_server

from nanoseek import checkpoint
from nanoseek import slots as slots_module
from nanoseek.chat import chat
from nanoseek.engine import Engine
from nanoseek.model import DeepSeekV3, config_for_size
from nanoseek.rejection import kept_chats
from nanoseek.sampling import SamplingParams
from nanoseek.serve import create_app
from nanoseek.template import ANSWER, CALL, FREE, THINK, control_ids, phase_after, template_masks
from nanoseek.tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_DISPLAY, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END

PROMPT, OTHER = [5, 60, 61, 62, 63], [70, 71, 72]
MARKUP = f"{TOOL_CALL_BEGIN}6*7{TOOL_CALL_END}{TOOL_OUTPUT_BEGIN}42{TOOL_OUTPUT_END}"


def call(tok, expression="6*7"):
    """The tokens of a call, as the model writes it."""
    return [tok.call_begin_id, *tok.encode(expression), tok.call_end_id]


def output(tok, result="42"):
    """The tokens the engine writes after it."""
    return [tok.output_begin_id, *tok.encode(result), tok.output_end_id]


def tiny_config(tokenizer):
    cfg = config_for_size(2, vocab_size=448)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    return cfg


@pytest.fixture(scope="module")
def peaky(tokenizer):
    """A random model with confident logits (no near-ties): its greedy tokens depend on the whole context."""
    model = DeepSeekV3(tiny_config(tokenizer)).init_weights(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(5)
    return model


def calling_model(tokenizer, expression="6*7"):
    """A random model whose greedy reply to anything is a call of expression (its tokens all different), then,
    after the tool's output, </think> and the end of sequence; by construction, as test_engine.looping_model:
    each scripted token's embedding is a huge axis of its own (every other token's a shared one) that outweighs
    the layers, and the output head maps each axis to the next token. Its MTP module drafts the same way (the
    block an identity, the projection keeping the next token's embedding), so the main model agrees with every
    draft."""
    tok = tokenizer
    script = call(tok, expression)
    following = dict(zip(script, script[1:])) | {tok.output_end_id: tok.end_think_id, tok.end_think_id: tok.eos_id}
    model = DeepSeekV3(tiny_config(tokenizer)).init_weights(0)
    axes = {token: axis for axis, token in enumerate(following)}
    other = len(axes)
    with torch.no_grad():
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.zero_()[:, other] = 1e4
        head.zero_()[script[0], other] = 1.0
        for token, axis in axes.items():
            embed[token, other], embed[token, axis] = 0.0, 1e4
            head[following[token], axis] = 1.0
        mtp = model.mtp[0]
        for p in mtp.block.parameters():
            p.zero_()
        D = embed.shape[1]
        mtp.eh_proj.weight.zero_()[:, :D] = torch.eye(D)
    return model


def scripted_sampling(scripts):
    """The engine's sample_tokens, but writing scripts[seed] as a seeded sequence's first tokens (the model's
    choices, set by a test); every other token is the engine's own draw."""
    draw = slots_module.sample_tokens

    def sample(logits, params, counters=None, noise=None):
        tokens = draw(logits, params, counters, noise)
        for row, (sp, index) in enumerate(zip(params, counters)):
            script = scripts.get(sp.seed, [])
            if index < len(script):
                tokens[row] = script[index]
        return tokens

    return sample


@pytest.fixture
def scripted(monkeypatch):
    """The engine samples with scripted_sampling -> the dict of scripts to fill."""
    scripts = {}
    monkeypatch.setattr(slots_module, "sample_tokens", scripted_sampling(scripts))
    return scripts


def greedy(max_tokens, seed=None, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0, seed=seed, **kw)


@pytest.mark.parametrize("max_batch", [1, 4])
def test_a_call_gets_its_result_as_forced_tokens_in_one_prefill(peaky, tokenizer, scripted, monkeypatch, max_batch):
    tok, script = tokenizer, call(tokenizer)
    scripted[1] = script
    engine = Engine(peaky, tok, max_batch=max_batch, compile=False)
    chunks, forward = [], engine.slots.forward
    monkeypatch.setattr(engine.slots, "forward", lambda ids, rows, starts: chunks.append((ids.tolist(), starts))
                        or forward(ids, rows, starts))
    (seq,) = engine.generate([PROMPT], greedy(24, seed=1, logprobs=True))
    n, forced = len(script), output(tok)
    assert seq.tokens[: n + len(forced)] == script + forced and len(seq.tokens) > n + len(forced)
    assert seq.forced == [False] * n + [True] * len(forced) + [False] * (len(seq.tokens) - n - len(forced))
    # the prompt's prefill, then the call's end and the output as one chunk at the call end's position
    assert chunks == [([PROMPT], [0]), ([[tok.call_end_id, *forced]], [len(PROMPT) + n - 1])]
    assert seq.text.startswith(MARKUP)
    assert [math.isnan(lp) for lp in seq.logprobs] == seq.forced  # forced: not drawn, no log-probability
    # the cache and the next logits are a prefill's of everything so far: the tokens after are greedy decoding's
    k = n + len(forced)
    (rest,) = Engine(peaky, tok, max_batch=1, compile=False).generate([PROMPT + seq.tokens[:k]], greedy(24 - k))
    assert seq.tokens[k:] == rest.tokens


def test_calls_answered_in_one_step_share_one_chunk_forward(peaky, tokenizer, scripted, monkeypatch):
    """Sequences whose calls end in the same step, with outputs of one length, write them in one batched
    forward; each goes on as it would alone."""
    tok = tokenizer
    scripted[1] = scripted[2] = call(tok)
    engine = Engine(peaky, tok, max_batch=4, compile=False)
    chunks, forward = [], engine.slots.forward
    monkeypatch.setattr(engine.slots, "forward", lambda ids, rows, starts: chunks.append((ids.shape, starts))
                        or forward(ids, rows, starts))
    both = engine.generate([PROMPT, OTHER], [greedy(20, seed=1), greedy(20, seed=2)])
    n = len(call(tok)) + len(output(tok))
    ends = [len(PROMPT) + len(call(tok)) - 1, len(OTHER) + len(call(tok)) - 1]  # each call's end token
    assert chunks[-1] == ((2, len(output(tok)) + 1), ends)
    for prompt, seed, seq in zip([PROMPT, OTHER], [1, 2], both):
        (alone,) = Engine(peaky, tok, max_batch=4, compile=False).generate([prompt], greedy(20, seed=seed))
        assert seq.tokens == alone.tokens and seq.forced == alone.forced and any(seq.forced[:n])


def test_other_sequences_decode_on_unaffected(peaky, tokenizer, scripted, monkeypatch):
    """The calling sequence's chunk runs in the step where the others decode; their tokens are those of a run
    without it."""
    tok = tokenizer
    scripted[1] = call(tok)
    engine = Engine(peaky, tok, max_batch=4, compile=False)
    steps, step = [], engine.step
    monkeypatch.setattr(engine, "step", lambda: steps.append(1) or step())
    caller, other = engine.generate([PROMPT, OTHER], [greedy(20, seed=1), greedy(20)])
    alone = Engine(peaky, tok, max_batch=4, compile=False).generate([OTHER], greedy(20))[0]
    assert any(caller.forced) and other.tokens == alone.tokens and not any(other.forced)
    assert len(steps) == max(len(other.tokens), caller.forced.count(False))  # no step of its own for the chunk


def test_with_tools_off_a_call_is_a_token_like_any_other(peaky, tokenizer, scripted):
    tok, script = tokenizer, call(tokenizer)
    scripted[1] = script
    off = Engine(peaky, tok, max_batch=2, compile=False, tools=False)
    assert not off.tools
    (seq,) = off.generate([PROMPT], greedy(16, seed=1))
    assert seq.tokens[: len(script)] == script and not any(seq.forced)
    (rest,) = off.generate([PROMPT + script], greedy(16 - len(script)))
    assert seq.tokens[len(script) :] == rest.tokens


def test_no_room_for_the_output_ends_with_length(peaky, tokenizer, scripted):
    """Forced tokens count toward max_tokens and the context: an output that does not fit is not written."""
    tok, script = tokenizer, call(tokenizer)
    n, forced = len(script), output(tok)
    scripted[1] = script
    engine = Engine(peaky, tok, max_batch=2, compile=False)
    cut = engine.generate([PROMPT], greedy(n + len(forced) - 1, seed=1))[0]
    assert (cut.tokens, cut.finish_reason) == (script, "length") and not any(cut.forced)
    just = engine.generate([PROMPT], greedy(n + len(forced), seed=1))[0]
    assert (just.tokens, just.finish_reason) == (script + forced, "length")
    for room, fits in ((len(forced) - 1, False), (len(forced), True)):
        small = Engine(peaky, tok, max_batch=2, compile=False, max_len=len(PROMPT) + n + room)
        seq = small.generate([PROMPT], greedy(100, seed=1))[0]
        assert seq.finish_reason == "length" and seq.tokens == script + forced * fits


def test_streams_carry_the_output_and_stops_see_it(peaky, tokenizer, scripted):
    tok, script = tokenizer, call(tokenizer)
    scripted[1] = script
    engine = Engine(peaky, tok, max_batch=2, compile=False)
    events = list(engine.stream(PROMPT, greedy(20, seed=1)))
    seq = events[-1].seq
    assert [t for e in events for t in e.token_ids] == seq.tokens and "".join(e.text for e in events) == seq.text
    (at_call,) = [e for e in events if tok.call_end_id in e.token_ids]
    assert at_call.token_ids == [tok.call_end_id, *output(tok)] and at_call.text.endswith(f"{TOOL_OUTPUT_END}")
    stopped = engine.generate([PROMPT], greedy(20, seed=1, stop=("42",)))[0]
    assert stopped.finish_reason == "stop" and stopped.text == MARKUP.partition("42")[0]


def test_a_call_that_does_not_compute_gets_an_error(peaky, tokenizer, scripted):
    tok = tokenizer
    scripted[1] = [tok.call_begin_id, *tok.encode("8/0"), tok.call_end_id]
    scripted[2] = [*tok.encode("1+1"), tok.call_end_id]  # an end with no begin
    division, unbegun = Engine(peaky, tok, max_batch=2, compile=False).generate(
        [PROMPT, PROMPT], [greedy(30, seed=1), greedy(30, seed=2)])
    assert f"{TOOL_OUTPUT_BEGIN}error: division by zero{TOOL_OUTPUT_END}" in division.text
    assert f"{TOOL_OUTPUT_BEGIN}error: no call began{TOOL_OUTPUT_END}" in unbegun.text


@pytest.mark.parametrize("expression, result", [("6*7", "42"), ("12*3", "36")])
def test_speculative_decoding_with_a_call_is_plain_greedy_decoding(tokenizer, expression, result):
    """Steps alternate a sampled token and a draft that stands: the call's end comes sampled (6*7), or drafted
    (12*3, the main model agreeing), when the draft is refused and the next plain step samples it and runs the
    tool. Either way the tokens are plain decoding's."""
    model, tok = calling_model(tokenizer, expression), tokenizer
    expected = call(tok, expression) + output(tok, result) + [tok.end_think_id, tok.eos_id]
    prompts = [PROMPT, OTHER, PROMPT[:2]]
    plain = Engine(model, tok, max_batch=4, compile=False).generate(prompts, greedy(20))
    fast = Engine(model, tok, max_batch=4, compile=False, speculative=True)
    assert fast.speculator.refused == control_ids(tok) and tok.call_end_id in control_ids(tok)
    for seq in plain + fast.generate(prompts, greedy(20)):
        assert seq.tokens == expected and seq.forced == [i in range(len(expected) - 6, len(expected) - 2)
                                                         for i in range(len(expected))]
    assert fast.acceptance_rate > 0.3


# ----------------------------------------------------------------------------- every consumer


def test_transformers_with_a_client_loop_gives_the_engines_tokens(tokenizer, tmp_path):
    """docs/INTEROP.md's loop: transformers stops at the call's end, the client computes and appends the output,
    and generation goes on; the tokens are the engine's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nanoseek.calculator import calculate

    path = tmp_path / "ckpt"
    checkpoint.save(path, calling_model(tokenizer, "12*3"), tokenizer)
    messages = [{"role": "user", "content": "12*3?"}]
    prompt, _ = tokenizer.render_chat(messages, add_generation_prompt=True)
    (expected,) = Engine(calling_model(tokenizer, "12*3"), tokenizer, compile=False).generate([prompt], greedy(20))

    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    begin, end, out_begin, out_end = tok.convert_tokens_to_ids(
        ["<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"])
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"]
    assert ids[0].tolist() == prompt
    while True:
        ids = model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=[tok.eos_token_id, end])
        seq = ids[0].tolist()
        if seq[-1] != end:
            break
        expression = tok.decode(seq[len(seq) - 1 - seq[::-1].index(begin) + 1 : -1])
        result = tok.encode(calculate(expression), add_special_tokens=False)
        ids = torch.tensor([seq + [out_begin, *result, out_end]])
    assert seq[len(prompt) :] == expected.tokens and any(expected.forced)


def test_chat_shows_the_call_and_its_result_in_the_thinking(tokenizer, tmp_path):
    import io

    path = tmp_path / "ckpt"
    checkpoint.save(path, calling_model(tokenizer), tokenizer)
    out = io.StringIO()
    chat(str(path), temperature=0, stdin=io.StringIO("what is 6*7?\n"), out=out)
    assert "thinking: [calc 6*7 = 42]\n\nnanoseek> " in out.getvalue()


def test_the_server_streams_the_call_in_reasoning_content(tokenizer):
    url, stop = start_server(create_app(Engine(calling_model(tokenizer), tokenizer, max_batch=2), "calc"))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        ask = {"model": "calc", "messages": [{"role": "user", "content": "6*7?"}], "temperature": 0}
        whole = client.chat.completions.create(**ask).choices[0].message
        assert whole.model_extra["reasoning_content"] == MARKUP and whole.content == ""
        deltas = [c.choices[0].delta for c in client.chat.completions.create(**ask, stream=True) if c.choices]
        assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == MARKUP
    finally:
        stop()


def test_the_web_page_shows_markup_as_chat_does():
    page = (Path(__file__).resolve().parents[1] / "nanoseek" / "web" / "index.html").read_text()
    assert f"const TOOL_DISPLAY = {json.dumps(TOOL_DISPLAY, ensure_ascii=False)};" in page
    assert "reasoningEl.textContent = showTools(reasoning)" in page


def test_a_kept_trace_trains_on_the_call_not_on_the_output(tokenizer):
    """Rejection sampling keeps a completion's text; its SFT conversation carries the markup in
    reasoning_content, so the renderer makes it control tokens and leaves the output untrained."""
    completion = f"{MARKUP}\nso 42\n</think>\n\n42"
    (messages,) = kept_chats([{"question": "What is 6*7?", "answer": "42", "difficulty": 1,
                               "completions": [completion]}])
    ids, mask = tokenizer.render_chat(messages)
    start = ids.index(tokenizer.call_begin_id)
    forced = output(tokenizer)
    at = ids.index(tokenizer.output_begin_id)
    assert ids[start:at] == call(tokenizer) and all(mask[start:at])
    assert ids[at : at + len(forced)] == forced and not any(mask[at : at + len(forced)])
    assert mask[at + len(forced)] == 1


# ----------------------------------------------------------------------------- the template's control tokens


def test_a_reply_writes_only_the_control_tokens_the_template_allows_where_it_is(tokenizer):
    """A model that would open another call after </think>: with tools, the answer cannot hold one or any other
    control token (the engine takes the likeliest allowed token); a prompt outside a turn is not constrained."""
    tok = tokenizer
    model = calling_model(tok)
    with torch.no_grad():  # after </think>, a call again instead of the end of sentence
        axis = model.model.embed_tokens.weight[tok.end_think_id].argmax()
        model.lm_head.weight[tok.eos_id, axis], model.lm_head.weight[tok.call_begin_id, axis] = 0.0, 1.0
    in_turn = [tok.bos_id, tok.user_id, *tok.encode("hi"), tok.assistant_id, tok.think_id]
    masked = Engine(model, tok, max_batch=2, compile=False).generate([in_turn], greedy(12))[0]
    answer = masked.tokens[masked.tokens.index(tok.end_think_id) + 1 :]
    assert masked.tokens[: len(call(tok)) + len(output(tok))] == call(tok) + output(tok)
    assert answer and not set(answer) & control_ids(tok)
    raw = Engine(model, tok, max_batch=2, compile=False).generate([OTHER], greedy(12))[0]  # not in a turn
    assert raw.tokens[raw.tokens.index(tok.end_think_id) + 1] == tok.call_begin_id


def test_the_template_phases_and_what_each_forbids(tokenizer):
    tok = tokenizer
    prompt = tok.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)[0]
    assert phase_after(prompt, tok) == THINK
    assert phase_after(prompt + call(tok)[:-1], tok) == CALL
    assert phase_after(prompt + call(tok) + output(tok), tok) == THINK
    assert phase_after(prompt + [tok.end_think_id], tok) == ANSWER
    assert phase_after(prompt + [tok.end_think_id, tok.eos_id], tok) == FREE
    masks = template_masks(tok, 448)
    allowed = lambda phase: {t for t in control_ids(tok) if not masks[phase, t]}
    assert allowed(THINK) == {tok.call_begin_id, tok.end_think_id}
    assert allowed(CALL) == {tok.call_end_id} and allowed(ANSWER) == set() and allowed(FREE) == control_ids(tok)
    assert not masks[:, tok.eos_id].any() and masks.sum() == sum(len(control_ids(tok) - allowed(p)) for p in range(4))
