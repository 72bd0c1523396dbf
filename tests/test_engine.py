"""The engine: greedy equals transformers, sampling is seeded, stops and streaming behave, MTP drafts."""

import pytest
import test_tools
import torch
from conftest import TINY
from test_tools import scripted_sampling
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

import nanoseek
from nanoseek import checkpoint, kv_cache
from nanoseek import engine as engine_module
from nanoseek import slots as slots_module
from nanoseek.aot import AotStep
from nanoseek.engine import Engine, EngineFull
from nanoseek.model import DeepSeekV3, config_for_size
from nanoseek.sampling import SamplingParams, sample_tokens
from nanoseek.text import RepetitionStop
from nanoseek.train import train

hf_logging.set_verbosity_error()
GREEDY = SamplingParams(max_tokens=64, temperature=0)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]]
CYCLE = [300, 301, 302]


def looping_model(tokenizer, context=2048):
    """A random model whose greedy output loops CYCLE whatever the prompt, by construction: each token's
    embedding is one huge axis (the cycle's tokens one each, every other token a fourth), so it outweighs
    the layers in the residual stream, and the output head maps that axis to the next token of the cycle."""
    cfg = config_for_size(2, vocab_size=448)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    cfg.max_position_embeddings = context
    model = DeepSeekV3(cfg).init_weights(0)
    with torch.no_grad():
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.zero_()[:, len(CYCLE)] = 1e4
        head.zero_()[CYCLE[0], len(CYCLE)] = 1.0
        for axis, token in enumerate(CYCLE):
            embed[token, len(CYCLE)], embed[token, axis] = 0.0, 1e4
            head[CYCLE[(axis + 1) % len(CYCLE)], axis] = 1.0
    return model


@pytest.fixture(scope="module")
def peaky(tmp_path_factory, tokenizer):
    """A random model with confident logits (no near-ties), saved as a checkpoint with the test tokenizer."""
    cfg = config_for_size(2, vocab_size=448)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    model = DeepSeekV3(cfg).init_weights(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(5)
    path = tmp_path_factory.mktemp("peaky") / "ckpt"
    checkpoint.save(path, model, tokenizer)
    return nanoseek.load(path) + (path,)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_data):
    """A tiny model trained with MTP on arithmetic, so its MTP module drafts well."""
    out = tmp_path_factory.mktemp("trained")
    train({**TINY, "data": text_data, "out": str(out), "steps": 80, "lr": 1e-2, "mtp_weight": 0.5}, "pretrain")
    return nanoseek.load(out / "final")


def reference(path, prompts, n):
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return [hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                        pad_token_id=0)[0, len(p):].tolist() for p in prompts]


def test_greedy_matches_transformers_batched_and_alone(peaky):
    model, tok, path = peaky
    expected = reference(path, PROMPTS, 64)
    engine = Engine(model, tok, max_batch=4, speculative=False, tools=False)  # transformers runs no tool
    engine.stop_ids = set()  # compare 64 tokens whatever they are
    batched = engine.generate(PROMPTS, GREEDY)
    alone = [engine.generate([p], GREEDY)[0] for p in PROMPTS]
    for b, a, ref in zip(batched, alone, expected):
        assert b.tokens == ref and a.tokens == ref and len(ref) == 64


def test_more_prompts_than_slots_are_queued(peaky):
    model, tok, _ = peaky
    engine = Engine(model, tok, max_batch=2, speculative=False)
    out = engine.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0))
    alone = [Engine(model, tok, max_batch=1, speculative=False).generate([p], SamplingParams(max_tokens=8,
             temperature=0))[0].tokens for p in PROMPTS]
    assert [s.tokens for s in out] == alone
    engine.add(PROMPTS[:2], GREEDY)
    with pytest.raises(EngineFull):
        engine.add(PROMPTS[2:], GREEDY)


def test_joining_a_running_batch_changes_nothing(peaky):
    model, tok, _ = peaky
    params = SamplingParams(max_tokens=20, temperature=0)
    alone = [Engine(model, tok, speculative=False).generate([p], params)[0].tokens for p in PROMPTS[:2]]
    engine = Engine(model, tok, max_batch=4, speculative=False)
    (first,) = engine.add([PROMPTS[0]], params)
    for _ in range(7):
        engine.step()
    (second,) = engine.add([PROMPTS[1]], params)  # joins mid-flight, continuous batching
    while not engine.idle:
        engine.step()
    assert [first.tokens, second.tokens] == alone


def test_seeded_sampling_is_reproducible(peaky):
    model, tok, _ = peaky
    engine = Engine(model, tok, max_batch=4)

    def sample(seed, **kw):
        return engine.generate([PROMPTS[0]], SamplingParams(max_tokens=30, temperature=1.5, seed=seed, **kw))[0].tokens

    assert sample(1) == sample(1) and sample(1) != sample(2)
    assert sample(3, top_k=5) == sample(3, top_k=5)
    greedy = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=30, temperature=0))[0].tokens
    assert sample(4, top_k=1)[:len(greedy)] == greedy and sample(5, top_p=1e-6)[:len(greedy)] == greedy
    assert sample(6, top_p=5e-324)[:len(greedy)] == greedy  # rounds to 0 in float32: still the top token


def test_stops(peaky):
    model, tok, _ = peaky
    engine = Engine(model, tok, speculative=False)
    free = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=40, temperature=0))[0]
    assert free.finish_reason in ("length", "stop")
    engine.stop_ids = {free.tokens[5]}
    cut = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=40, temperature=0))[0]
    first = free.tokens.index(free.tokens[5])
    assert cut.finish_reason == "stop" and cut.tokens == free.tokens[: first + 1]
    assert cut.text == tok.decode(free.tokens[:first])  # the stop token is not part of the text
    engine.stop_ids = {tok.eos_id}
    text = tok.decode(free.tokens)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=40, temperature=0, stop=(stop,)))[0]
    assert stopped.finish_reason == "stop" and stopped.text == text[: text.find(stop)]
    short = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=3, temperature=0))[0]
    assert short.finish_reason == "length" and len(short.tokens) == 3
    small = Engine(model, tok, max_len=12, speculative=False)
    small.stop_ids = set()
    ctx = small.generate([PROMPTS[0]], SamplingParams(max_tokens=100, temperature=0))[0]
    assert ctx.finish_reason == "length" and len(PROMPTS[0]) + len(ctx.tokens) == 12
    with pytest.raises(ValueError, match="context holds 12"):
        small.add([list(range(12))], GREEDY)


def test_repetition_rule_on_token_lists():
    def stops_after(tokens, threshold):  # how many tokens the rule lets through, None if it never stops
        rule = RepetitionStop(threshold)
        return next((i + 1 for i, token in enumerate(tokens) if rule.add(token)), None)

    assert stops_after([9, 8] + [1, 2, 3] * 10, 12) == 2 + 12  # a cycle of 3 once it covers 12 tokens
    assert stops_after([7] * 10, 5) == 5
    assert stops_after([5, 1, 2, 3, 1, 2, 3], 2) == 7  # a block repeats at least twice, whatever the threshold
    assert stops_after(list(range(300)), 2) is None  # nothing repeats
    assert stops_after([1, 2, 3] * 3 + [4] + [1, 2, 3] * 3, 12) is None  # broken before 12 tokens
    assert stops_after(list(range(40)) * 3, 64) is None  # blocks longer than MAX_PERIOD are not looked for


def test_repetition_stop_ends_a_looping_generation(tokenizer):
    engine = Engine(looping_model(tokenizer), tokenizer, speculative=False)
    prompt = [tokenizer.bos_id] + tokenizer.encode("What is 12 + 30?")
    on, off = (SamplingParams(max_tokens=90, temperature=0, repetition_stop=n) for n in (24, 0))
    looped, endless = engine.generate([prompt, prompt], [on, off])
    assert endless.finish_reason == "length" and endless.tokens == CYCLE * 30  # it loops, by construction
    assert looped.finish_reason == "repetition" and looped.tokens == endless.tokens[:24]
    assert looped.text == tokenizer.decode(looped.tokens)  # what was generated, uncut
    events = list(engine.stream(prompt, on))
    assert events[-1].finished and events[-1].seq.finish_reason == "repetition" and len(events) == 24
    assert SamplingParams().repetition_stop == 0  # off unless asked: eval and GRPO run as before


def test_streaming_deltas_add_up(peaky):
    model, tok, _ = peaky
    engine = Engine(model, tok)
    params = SamplingParams(max_tokens=30, temperature=0.8, seed=7, stop=("ab",))
    deltas = [e.text for e in engine.stream(PROMPTS[1], params)]
    whole = Engine(model, tok).generate([PROMPTS[1]], params)[0]
    assert "".join(deltas) == whole.text and len(deltas) > 1


def test_logprobs_match_a_full_forward(peaky):
    model, tok, _ = peaky
    engine = Engine(model, tok)
    s = engine.generate([PROMPTS[2]], SamplingParams(max_tokens=10, temperature=1.0, seed=0, logprobs=True))[0]
    ids = torch.tensor([PROMPTS[2] + s.tokens])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0, len(PROMPTS[2]) - 1 : -1], -1)
    expected = logp.gather(1, torch.tensor(s.tokens)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(s.logprobs), expected, rtol=1e-4, atol=1e-4)


def test_mtp_speculative_decoding_is_exact_and_accepts(trained):
    model, tok = trained
    prompts = [[tok.bos_id] + tok.encode(t) for t in ("12 + 34 =", "7 + 5", "99 + 1 = 100.")]  # as trained
    params = SamplingParams(max_tokens=24, temperature=0, logprobs=True)
    plain = Engine(model, tok, speculative=False).generate(prompts, params)
    fast = Engine(model, tok, speculative=True)
    drafted = fast.generate(prompts, params)
    assert [s.tokens for s in drafted] == [s.tokens for s in plain]
    for a, b in zip(drafted, plain):  # a drafted token's log-probability is its verification's
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=1e-4, atol=1e-4)
    assert fast.speculator.drafted > 0 and fast.acceptance_rate > 0.3


def test_speculative_greedy_beside_sampled_sequences_is_exact(trained):
    """Greedy sequences in a speculative engine decode plainly while a sampled one shares the batch, and
    speculate again once it has gone: the same tokens as a plain engine's, whenever they joined."""
    model, tok = trained
    prompts = [[tok.bos_id] + tok.encode(t) for t in ("12 + 34 =", "7 + 5")]
    params = SamplingParams(max_tokens=24, temperature=0)
    plain, fast = Engine(model, tok, speculative=False), Engine(model, tok, max_batch=4, speculative=True)
    plain.stop_ids = fast.stop_ids = set()  # 24 tokens each, past the end of sequence
    plain = [s.tokens for s in plain.generate(prompts, params)]
    (first,) = fast.add(prompts[:1], params)
    fast.add(prompts[:1], SamplingParams(max_tokens=6, temperature=1.0, seed=0))
    fast.step()
    (second,) = fast.add(prompts[1:], params)
    while not fast.idle:
        fast.step()
    assert [first.tokens, second.tokens] == plain and fast.speculator.accepted > 0


def test_one_sequence_steps_compiled_ahead_of_time(trained, tmp_path, monkeypatch):
    """An engine of one sequence on a CPU runs its steps as packages compiled ahead of time: plain and
    speculative greedy tokens as eager decoding's, seeded draws too; the packages are kept on disk and a
    later engine loads them without exporting anything; their weights are the model's own tensors, so a
    change made in place is decoded with; packages of other nanoseek source are deleted. Speculation is off
    unless asked."""
    model, tok = trained
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    prompts = [[tok.bos_id] + tok.encode(t) for t in ("12 + 34 =", "7 + 5", "99 + 1 = 100.")]
    greedy, seeded = SamplingParams(max_tokens=24, temperature=0), SamplingParams(max_tokens=24, seed=3)

    def tokens(engine, params=greedy):
        engine.stop_ids = set()
        return [engine.generate([p], params)[0].tokens for p in prompts]

    eager = Engine(model, tok, max_batch=1, compile=False)
    assert eager.speculator is None
    expected, expected_seeded = tokens(eager), tokens(eager, seeded)
    older = tmp_path / "nanoseek" / "aot" / "decode_step-0123456789ab-0123456789abcdef0123.pt2"
    older.parent.mkdir(parents=True)
    older.write_bytes(b"a package of other nanoseek source")
    plain = Engine(model, tok, max_batch=1, compile=True)
    fast = Engine(model, tok, max_batch=1, speculative=True, compile=True)
    for step in (plain.slots.decode_step, fast.speculator.step):  # packages, not the torch.compile fallback
        assert isinstance(step, AotStep) and step.run is not step.fallback
    assert tokens(plain) == expected and tokens(plain, seeded) == expected_seeded
    assert tokens(fast) == expected and fast.acceptance_rate > 0.3
    with monkeypatch.context() as m:  # a tool call (a scripted choice): its chunk runs eagerly beside the package
        m.setattr(slots_module, "sample_tokens", scripted_sampling({1: test_tools.call(tok)}))
        calling = SamplingParams(max_tokens=24, temperature=0, seed=1)
        assert tokens(plain, calling) == tokens(eager, calling)
        assert all(t[4:9] == [tok.call_end_id, *test_tools.output(tok)] for t in tokens(plain, calling))
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "nanoseek" / "aot").iterdir()) == \
        ["decode_step", "speculative_step"] and not older.exists()  # the other source's package deleted

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(torch.export, "export", no_export)
    again = Engine(model, tok, max_batch=1, compile=True)
    assert tokens(again) == expected
    head = model.lm_head.weight
    saved = head.detach().clone()
    with torch.no_grad():
        head[:, : head.shape[1] // 2] *= -1
    try:
        assert tokens(again) == tokens(eager) != expected
    finally:
        with torch.no_grad():
            head.copy_(saved)


def test_a_server_engine_decodes_a_lone_request_ahead_of_time(trained, tmp_path, monkeypatch):
    """An engine of several slots with ahead_of_time (the server's) decodes a lone request with a package and
    several together with torch.compile: eager decoding's tokens either way."""
    model, tok = trained
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    prompts = [[tok.bos_id] + tok.encode(t) for t in ("12 + 34 =", "7 + 5", "99 + 1 = 100.")]
    greedy = SamplingParams(max_tokens=24, temperature=0)
    eager = Engine(model, tok, max_batch=4, compile=False)
    served = Engine(model, tok, max_batch=4, compile=True, ahead_of_time=True)
    for engine in (eager, served):
        engine.stop_ids = set()
    one = served.slots.decode_step.one  # compiled by the engine's warm-up
    assert isinstance(one, AotStep) and one.run is not one.fallback
    assert [served.generate([p], greedy)[0].tokens for p in prompts] == \
        [eager.generate([p], greedy)[0].tokens for p in prompts]
    assert [s.tokens for s in served.generate(prompts, greedy)] == [s.tokens for s in eager.generate(prompts, greedy)]
    assert [p.name.split("-")[0] for p in (tmp_path / "nanoseek" / "aot").iterdir()] == ["decode_step"]


def test_a_step_that_cannot_be_compiled_ahead_of_time_falls_back(peaky, tmp_path, monkeypatch):
    """Where export fails, the engine warns and runs its step under torch.compile instead."""
    model, tok, _ = peaky
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def no_export(*args, **kwargs):
        raise RuntimeError("cannot trace this")

    monkeypatch.setattr(torch.export, "export", no_export)
    with pytest.warns(UserWarning, match="cannot trace this"):
        engine = Engine(model, tok, max_batch=1, compile=True)
    engine.stop_ids = set()
    eager = Engine(model, tok, max_batch=1, compile=False)
    eager.stop_ids = set()
    assert engine.generate([PROMPTS[0]], GREEDY)[0].tokens == eager.generate([PROMPTS[0]], GREEDY)[0].tokens


def test_compiled_speculative_step_is_exact_without_graph_breaks(trained):
    """Draft and verification compiled as one graph decode exactly what plain greedy decoding does, alone
    and in a batch, with nothing falling back to Python."""
    model, tok = trained
    prompts = [[tok.bos_id] + tok.encode(t) for t in ("12 + 34 =", "7 + 5", "99 + 1 = 100.")]
    params = SamplingParams(max_tokens=24, temperature=0)
    plain = [s.tokens for s in Engine(model, tok, speculative=False).generate(prompts, params)]
    torch._dynamo.utils.counters.clear()
    fast = Engine(model, tok, max_batch=4, speculative=True, compile=True)
    assert [s.tokens for s in fast.generate(prompts, params)] == plain
    assert [fast.generate([p], params)[0].tokens for p in prompts] == plain
    assert not torch._dynamo.utils.counters["graph_break"] and fast.acceptance_rate > 0.3


def test_kv_cache_holds_only_the_latent(peaky):
    model, tok, _ = peaky
    cfg = model.config
    engine = Engine(model, tok)
    assert engine.cache.bytes_per_token() == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


def test_cache_grows_to_what_the_sequences_need(peaky):
    model, tok, _ = peaky
    engine = Engine(model, tok, max_batch=4)
    engine.stop_ids = set()
    assert engine.max_len == model.config.max_position_embeddings and engine.cache.length == 0
    first = engine.generate(PROMPTS, SamplingParams(max_tokens=20, temperature=0))
    assert engine.cache.length == engine.cache.rope[0].shape[1] == 128  # longest: 11 + 20 tokens
    long = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=140, temperature=0))[0]
    assert len(long.tokens) == 140 and engine.cache.length == 256  # 5 + 140, in blocks of 128
    # the next request starts from an empty cache: its steps attend over what it needs, not what the long one did
    again = engine.generate(PROMPTS, SamplingParams(max_tokens=20, temperature=0))
    assert engine.cache.length == 128 and [s.tokens for s in again] == [s.tokens for s in first]
    joined = engine.add([PROMPTS[0]], SamplingParams(max_tokens=140, temperature=0))[0]
    engine.step()
    engine.add([PROMPTS[1]], SamplingParams(max_tokens=5, temperature=0))  # joins a running one: nothing cleared
    while not engine.idle:
        engine.step()
    assert joined.tokens == long.tokens and engine.cache.length == 256
    short = Engine(model, tok, max_batch=1, max_len=40, speculative=False)
    short.generate([PROMPTS[0]], SamplingParams(max_tokens=100, temperature=0))
    assert short.cache.length == 40  # never past max_len


def test_sampling_a_batch_equals_sampling_each_alone(peaky):
    """Rows with different settings sampled together: each gets what it gets alone (the seeded ones)."""
    model, tok, _ = peaky
    params = [SamplingParams(max_tokens=25, temperature=1.5, seed=1), SamplingParams(max_tokens=25, temperature=0),
              SamplingParams(max_tokens=25, temperature=0.7, top_k=5, seed=2),
              SamplingParams(max_tokens=25, temperature=1.2, top_p=0.5, seed=3, logprobs=True)]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0]]
    together = Engine(model, tok, max_batch=4).generate(prompts, params)
    alone = [Engine(model, tok, max_batch=1).generate([p], sp)[0] for p, sp in zip(prompts, params)]
    assert [s.tokens for s in together] == [s.tokens for s in alone]
    assert together[3].logprobs == pytest.approx(alone[3].logprobs, abs=1e-5) and len(together[3].logprobs) == 25


def test_sample_tokens_draws_from_the_filtered_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 40_000
    cases = [(SamplingParams(temperature=1.0), torch.softmax(logits, -1)),
             (SamplingParams(temperature=2.0, top_k=3), torch.softmax(logits[:3] / 2, -1)),
             (SamplingParams(temperature=1.0, top_p=0.7), torch.softmax(logits[:2], -1))]  # p = .56, .21, ...
    for params, expected in cases:
        tokens = sample_tokens(logits.expand(n, -1), [params] * n, [None] * n)
        freq = torch.bincount(tokens, minlength=len(logits)).float() / n
        torch.testing.assert_close(freq[: len(expected)], expected, atol=0.01, rtol=0)
        assert freq[len(expected):].sum() == 0
    greedy = sample_tokens(logits.expand(3, -1), [SamplingParams(temperature=0)] * 3, [None] * 3)
    assert greedy.tolist() == [0, 0, 0]


def test_seeded_draws_follow_the_distribution_and_depend_only_on_seed_and_index():
    """A seeded row's draw is a function of (seed, token index): a batch of 40,000 seeds draws from the
    distribution, a row drawn alone or beside others draws the same, and another index draws anew."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 40_000
    params = [SamplingParams(temperature=1.0, seed=2**40 + i) for i in range(n)]
    tokens = sample_tokens(logits.expand(n, -1), params, [7] * n)
    freq = torch.bincount(tokens, minlength=len(logits)).float() / n
    torch.testing.assert_close(freq, torch.softmax(logits, -1), atol=0.01, rtol=0)
    torch.manual_seed(1)  # unseeded rows beside them draw from torch's generator, which seeded rows never read
    mixed = sample_tokens(logits.expand(4, -1), [params[5], SamplingParams(), params[6], SamplingParams()], [7] * 4)
    assert mixed[[0, 2]].tolist() == tokens[5:7].tolist()
    assert [sample_tokens(logits[None], [params[i]], [7]).item() for i in range(50)] == tokens[:50].tolist()
    later = sample_tokens(logits.expand(200, -1), params[:200], [8] * 200)
    assert (later != tokens[:200]).any()


def test_bad_requests(peaky):
    model, tok, _ = peaky
    engine = Engine(model, tok)
    with pytest.raises(ValueError, match="empty"):
        engine.add([[]], GREEDY)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add([[1, 2]], SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="temperature"):
        engine.add([[1, 2]], SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="repetition_stop must be >= 0"):
        engine.add([[1, 2]], SamplingParams(repetition_stop=-1))


def test_chunked_prefill_gives_the_same_tokens(trained):
    """Prompts prefilled in forwards of at most prefill_tokens tokens decode exactly as in one forward."""
    model, tok = trained
    long = [tok.encode("12 + 34 = 46. 7 + 5 = 12. 99 + 1 ="), tok.encode("7 + 5"), tok.encode("3")]
    short = [[5, 6], [7], [8, 9]]  # two prompts per forward
    params = SamplingParams(max_tokens=16, temperature=0)
    for prompts in (long, short):
        for speculative in (False, True):
            whole = Engine(model, tok, speculative=speculative).generate(prompts, params)
            chunked = Engine(model, tok, speculative=speculative)
            chunked.prefill_tokens = 5
            sizes = []
            chunked.slots.forward = recording(chunked.slots.forward, sizes)
            seqs = chunked.add(prompts, params)
            del chunked.slots.forward
            assert max(sizes) <= 5 and len(sizes) >= (3 if prompts is long else 2)
            while not chunked.idle:
                chunked.step()
            assert [s.tokens for s in seqs] == [s.tokens for s in whole]


def recording(forward, sizes):
    def record(ids, *a):
        sizes.append(ids.numel())
        return forward(ids, *a)
    return record


class Injected(RuntimeError):
    pass


def fail_on_call(k):
    """A stand-in that raises on its k-th call and otherwise calls through."""
    calls = []

    def wrap(real):
        def fn(*a, **kw):
            calls.append(1)
            if len(calls) == k:
                raise Injected(f"call {k}")
            return real(*a, **kw)
        return fn
    return wrap


@pytest.mark.parametrize("point", ["validate", "text", "forward", "forward2", "mtp", "lm_head"])
def test_add_is_all_or_nothing(trained, point, monkeypatch):
    """A failure at any point of admission leaves every slot free and nothing running."""
    model, tok = trained
    engine = Engine(model, tok, max_batch=4, speculative=True)
    engine.prefill_tokens = 6  # two forwards for the prompts below
    (running,) = engine.add([[5, 6, 7]], GREEDY)
    params = [SamplingParams(max_tokens=8, temperature=1.0, seed=i) for i in range(3)]
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13]]
    if point == "validate":
        params[2] = SamplingParams(max_tokens=0)
    elif point == "text":  # the third sequence's text stream cannot be made
        monkeypatch.setattr(engine_module, "TextStream", fail_on_call(3)(engine_module.TextStream))
    elif point in ("forward", "forward2"):
        monkeypatch.setattr(engine.slots, "forward", fail_on_call(1 if point == "forward" else 2)(engine.slots.forward))
    elif point == "mtp":
        monkeypatch.setattr(engine.speculator, "forward", fail_on_call(2)(engine.speculator.forward))
    else:
        monkeypatch.setattr(model.lm_head, "forward", fail_on_call(1)(model.lm_head.forward))
    free_before = list(engine.free)
    with pytest.raises((Injected, ValueError)):
        engine.add(prompts, params)
    assert engine.free == free_before and list(engine.running) == [running.id]
    monkeypatch.undo()
    assert len(engine.add([[1, 2]] * 3, GREEDY)) == 3  # the full width is still there
    assert not engine.free


def test_seed_range(peaky):
    model, tok, _ = peaky
    engine = Engine(model, tok, max_batch=2)
    with pytest.raises(ValueError, match="seed"):
        engine.add([[1, 2], [3, 4]], [SamplingParams(seed=2**64 - 1), SamplingParams(seed=2**64)])
    assert len(engine.free) == 2
    assert len(engine.add([[1, 2]], SamplingParams(seed=2**64 - 1))) == 1


def test_compiled_decode_step_gives_the_same_tokens(peaky):
    """The compiled decode step (one graph while batch and cache length vary) decodes as the eager one:
    greedy tokens equal transformers' batched and alone, seeded draws equal eager's, and nothing in the
    step falls back to Python (no graph break)."""
    model, tok, path = peaky
    expected = reference(path, PROMPTS, 64)
    torch._dynamo.utils.counters.clear()
    engine = Engine(model, tok, max_batch=4, speculative=False, compile=True, tools=False)
    engine.stop_ids = set()
    assert [s.tokens for s in engine.generate(PROMPTS, GREEDY)] == expected
    assert [engine.generate([p], GREEDY)[0].tokens for p in PROMPTS] == expected
    assert not torch._dynamo.utils.counters["graph_break"]
    seeded = SamplingParams(max_tokens=30, temperature=1.5, seed=1, top_k=5)
    eager = Engine(model, tok, speculative=False, compile=False)
    eager.stop_ids = set()
    assert [s.tokens for s in engine.generate(PROMPTS, seeded)] == [s.tokens for s in eager.generate(PROMPTS, seeded)]


@pytest.mark.parametrize("width", [1, 2])
def test_compiled_step_attention_equals_eager(width):
    """A compiled step over one or two positions a row (decoding, speculative verification) computes attention
    as sums that fuse (model.few_query_attention) and sends its few tokens through their gathered experts:
    the hidden states and the cache it writes equal the eager forward's, rows at different lengths."""
    model = DeepSeekV3(config_for_size(2, vocab_size=448)).init_weights(3).eval()
    cfg = model.config
    rows, starts = torch.tensor([2, 0]), torch.tensor([9, 4])
    ids = torch.randint(3, 448, (2, width), generator=torch.Generator().manual_seed(width))
    step = torch.compile(kv_cache.decode_forward, fullgraph=True, dynamic=False)
    outputs = []
    for run in (kv_cache.decode_forward, step):
        cache = kv_cache.LatentCache(cfg.num_hidden_layers, 3, 64, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                                          torch.float32, "cpu")
        cache.reserve(16)
        for t in cache.latent + cache.rope:  # earlier positions, as a prefill would have left them
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(0)))
        with torch.no_grad():
            outputs.append((run(model, ids, starts, rows, cache.latent, cache.rope), cache.latent + cache.rope))
    (eager, eager_cache), (compiled, compiled_cache) = outputs
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled_cache, eager_cache):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_an_engine_for_another_checkpoint_of_the_same_shape_compiles_nothing(peaky):
    """The compiled decode step is made once per process and model shape: an engine for other weights of the
    same shape runs the graphs already compiled (no new graph) and decodes with its own weights."""
    model, tok, _ = peaky
    Engine(model, tok, max_batch=4, speculative=False, compile=True)
    other = DeepSeekV3(model.config).init_weights(1)
    with torch.no_grad():
        for p in other.parameters():
            if p.dim() >= 2:
                p.mul_(5)
    torch._dynamo.utils.counters.clear()
    engine = Engine(other, tok, max_batch=4, speculative=False, compile=True)
    engine.stop_ids = set()
    tokens = [s.tokens for s in engine.generate(PROMPTS, GREEDY)]
    assert not torch._dynamo.utils.counters["stats"]["unique_graphs"]
    eager = Engine(other, tok, max_batch=4, speculative=False, compile=False)
    eager.stop_ids = set()
    assert tokens == [s.tokens for s in eager.generate(PROMPTS, GREEDY)]
    first = Engine(model, tok, max_batch=4, speculative=False, compile=False)
    first.stop_ids = set()
    assert tokens != [s.tokens for s in first.generate(PROMPTS, GREEDY)]


def test_the_engine_owns_its_compute_dtype(peaky):
    """Engine(dtype="bfloat16") keeps a bf16 latent cache and runs the model under its own autocast: its
    log-probabilities are the same whether the caller wraps autocast or not, and not those of float32."""
    model, tok, _ = peaky
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=True)

    def logprobs(dtype, caller_autocast=False):
        engine = Engine(model, tok, max_batch=2, speculative=False, dtype=dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=caller_autocast):
            seqs = engine.generate(PROMPTS[:2], params)
        return engine, [s.logprobs for s in seqs]

    engine, bf16 = logprobs("bfloat16")
    assert engine.cache.latent[0].dtype == torch.bfloat16
    assert logprobs("bfloat16", caller_autocast=True)[1] == bf16
    fp32_engine, fp32 = logprobs("float32")
    assert fp32_engine.cache.latent[0].dtype == torch.float32 and fp32 != bf16
    assert Engine(model, tok, max_batch=1).compute.dtype == torch.float32  # auto on a CPU


def test_text_is_decoded_incrementally_and_equals_the_whole(peaky, tokenizer, monkeypatch):
    """Sampled text (random bytes included, so characters split across tokens) equals decoding all the tokens
    at once; and a long generation decodes a bounded number of tokens per step, at its end as at its start."""
    model, tok, _ = peaky
    params = [SamplingParams(max_tokens=96, temperature=1.5, seed=i) for i in range(8)]
    seqs = Engine(model, tok, max_batch=8, speculative=False).generate([PROMPTS[i % 3] for i in range(8)], params)
    for s in seqs:
        visible = s.tokens[:-1] if s.finish_reason == "stop" else s.tokens
        assert s.text == tok.decode(visible)
    assert any(tok.decode([t]).endswith("\ufffd") for s in seqs for t in s.tokens)  # split characters were met
    decoded = []
    original = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **kw: decoded.append(len(ids)) or original(ids, **kw))
    long = Engine(looping_model(tokenizer, context=4096), tokenizer, speculative=False)
    s = long.generate([PROMPTS[0]], SamplingParams(max_tokens=4000, temperature=0, stop=("never in it",)))[0]
    assert len(s.tokens) == 4000 and s.text == original(s.tokens)
    assert max(decoded) <= 4 and len(decoded) == 4000  # one short decode per token, never the whole text
