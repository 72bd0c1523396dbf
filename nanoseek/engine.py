"""One engine for every generation: RL rollouts, evaluation, chat and the server.

Sequences live in slots of a latent KV cache (step.py). A step samples one token for every running sequence
and runs one batched forward, compiled into one graph (step.decode_step; for one sequence on a CPU compiled
ahead of time in chat and the server, aot.py); sequences join (`add`, a chunked eager prefill) and leave
between steps, which is all continuous batching needs. With speculative=True and greedy decoding, a step
drafts one more token with the MTP module and verifies it in the same graph (speculation.py): the output is
exactly plain greedy decoding's.

Tools: when a sequence samples the tool-call end token, the engine runs the calculator (calculator.py) on the
text since the last call-begin token and appends output-begin, the result and output-end to the sequence as
forced tokens (Sequence.forced), which count toward max_tokens and the context like any other (no room:
finish_reason "length"). They enter the cache with the call's end as one prefill chunk at the sequence's
position, while the other sequences decode in the same step, and its next logits are the chunk's last. A
completion's text shows the markup as the tokens' strings. Speculation never lets a drafted call end stand
(the next plain step samples it), so speculative output stays plain greedy decoding's; the chunk is eager, so
the one-sequence step compiled ahead of time is untouched. tools=False: the call end is a token like any other.

Sampling lives in sampling.py, a sequence's text (detokenising, stop strings, streaming) in text.py.
"""

import itertools
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nanoseek.aot import AotStep
from nanoseek.calculator import calculate
from nanoseek.device import policy
from nanoseek.model import DeepSeekV3
from nanoseek.sampling import SamplingParams, sample_tokens, seeded_noise
from nanoseek.speculation import Speculator, speculative_step
from nanoseek.step import LatentCache, compile_options, decode_forward, decode_step
from nanoseek.text import RepetitionStop, TextStream

COMPILE = os.environ.get("NANOSEEK_COMPILE", "1") != "0"  # compile the decode step; NANOSEEK_COMPILE=0: eager
COMPILE_NOTE = "compiling the decode step (seconds, once; NANOSEEK_COMPILE=0 decodes without)"


class EngineFull(RuntimeError):
    """Every slot is taken; try again when a sequence finishes."""


@dataclass
class Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    slot: int
    tokens: list[int] = field(default_factory=list)  # generated: sampled, and forced by a tool
    forced: list[bool] = field(default_factory=list)  # per token: True where a tool wrote it, not the model
    logprobs: list[float] = field(default_factory=list)  # with params.logprobs, per token; nan where forced
    finish_reason: str | None = None  # "stop", "length", "repetition" or "abort"
    text_state: TextStream | None = None  # how text is made from tokens
    repeats: RepetitionStop | None = None  # with params.repetition_stop > 0
    mtp_states: list = field(default_factory=list)  # speculation: main hidden states the MTP cache lacks

    @property
    def text(self):  # decoded generated text, cut at a stop string
        return self.text_state.text if self.text_state is not None else ""

    @property
    def length(self):  # tokens in the cache
        return len(self.prompt) + len(self.tokens) - 1 if self.tokens else len(self.prompt)


@dataclass
class Event:
    """What a step produced for one sequence: new token ids, the new text, and whether it finished."""

    seq: Sequence
    token_ids: list[int]
    text: str
    finished: bool


class Engine:
    """Slots of a latent cache, sequences joining and leaving them, and one compiled forward a step."""

    def __init__(self, model: DeepSeekV3, tokenizer, max_batch=16, max_len=None, speculative=False, compile=None,
                 dtype=None, ahead_of_time=None, tools=True):
        """dtype: the compute dtype, auto (bfloat16 on a GPU, float32 on a CPU), bfloat16 or float32. The
        engine runs the model under its autocast and keeps its latent cache in it; callers wrap nothing.
        ahead_of_time: a compiling engine on a CPU in float32 runs its steps for one sequence as packages
        compiled ahead of time (aot.py; ~1.6x the tokens a second of torch.compile's one-sequence graph), so
        the model's weights must change only in place. Default: for an engine of one slot (chat); a server
        passes True, as most of its steps are a lone request's. Steps of several sequences keep torch.compile.
        speculative: MTP self-speculation for greedy steps (with an MTP module). Off by default: on a CPU a
        speculative step costs ~2 plain steps at one sequence (both compiled ahead of time) and ~1 at 16, so
        even with 99% of drafts standing it gains nothing measurable (docs/BENCHMARKS.md); on a GPU it has not
        been measured.
        tools: run the calculator when a sequence writes a tool call (see the module docstring), where the
        tokenizer has tool tokens; False decodes as transformers and llama.cpp do, for comparing tokens."""
        self.model, self.tokenizer = model.eval(), tokenizer
        cfg = model.config
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self.compute = policy(str(self.device), dtype)
        shape = (max_batch, self.max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, self.compute.dtype, self.device)
        self.cache = LatentCache(cfg.num_hidden_layers, *shape)
        self.logits = torch.zeros(max_batch, cfg.vocab_size, device=self.device)  # each slot's next-token logits
        self.free = list(range(max_batch - 1, -1, -1))
        self.running: dict[int, Sequence] = {}
        self.ids = itertools.count()
        self.stop_ids = {tokenizer.eos_id} if tokenizer is not None else {cfg.eos_token_id}
        self.tools = tools and tokenizer is not None and tokenizer.tools
        compile = COMPILE if compile is None else compile
        self.ahead_of_time = max_batch == 1 if ahead_of_time is None else ahead_of_time
        self.decode_step = self.compiled(decode_step) if compile else decode_step
        # the seeded draws' integer hashing, compiled at the first seeded draw (chat never makes one)
        self.noise = torch.compile(seeded_noise, dynamic=True) if compile else seeded_noise
        self.speculator = None
        if speculative and len(model.mtp):
            step = self.compiled(speculative_step) if compile else speculative_step
            refused = {tokenizer.call_end_id} if self.tools else set()  # a call ends sampled, then runs
            self.speculator = Speculator(model, self.cache, self.compute, step, refused)
        if compile:
            self.warm_up()

    prefill_tokens = 2048  # tokens (prompts x positions) per prefill forward: bounds its activations

    def compiled(self, step):
        """A step compiled for this engine: torch.compile, and with ahead_of_time on a CPU in float32, a
        package for one sequence (AotStep: no guards, weights bound once, ~0.25 ms less a call), where
        torch.compile's runtime would be most of a step."""
        jit = torch.compile(step, **compile_options(self.device))
        if not (self.ahead_of_time and self.device.type == "cpu" and self.compute.dtype == torch.float32):
            return jit
        one = AotStep(step, self.model, fallback=jit)
        return one if self.max_batch == 1 else OneOrMore(one, jit)

    @property
    def refill(self):
        """Free slots generate() waits for before it prefills queued prompts: a quarter of the batch, so a
        prefill forward takes several prompts at once instead of one each time a sequence ends."""
        return max(1, self.max_batch // 4)

    # ------------------------------------------------------------------------- joining and leaving

    @torch.no_grad()
    def add(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        """Prefill prompts into free slots; they decode from the next step on. All or nothing: if any part
        fails, no slot is taken and nothing runs."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(prompts) > len(self.free):
            raise EngineFull(f"{len(self.running)} sequences are running and the engine holds {self.max_batch}")
        for prompt, sp in zip(prompts, params):
            sp.validate()
            if not prompt:
                raise ValueError("the prompt is empty")
            if len(prompt) >= self.max_len:
                raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {self.max_len}, "
                                 "so shorten it to leave room for an answer")
        if not self.running:  # nothing cached is needed any more
            for cache in [self.cache] + ([self.speculator.cache] if self.speculator else []):
                cache.clear()
        taken = len(self.free) - len(prompts)
        slots = self.free[taken:][::-1]  # the slots pop() would give, taken only once the prefill is done
        seqs = [Sequence(next(self.ids), list(prompt), sp, slot, text_state=TextStream(self.tokenizer, sp.stop),
                         repeats=RepetitionStop(sp.repetition_stop) if sp.repetition_stop else None)
                for prompt, sp, slot in zip(prompts, params, slots)]
        rows_per_forward = max(1, self.prefill_tokens // max(len(s.prompt) for s in seqs)) if seqs else 1
        for i in range(0, len(seqs), rows_per_forward):
            self._prefill(seqs[i : i + rows_per_forward])
        del self.free[taken:]
        for s in seqs:
            self.running[s.id] = s
        return seqs

    def _prefill(self, seqs):
        """Write the prompts into their slots' cache in forwards of at most `prefill_tokens` tokens (rows x
        positions), so peak memory stays bounded however long the prompts; sets each one's next logits."""
        width = max(len(s.prompt) for s in seqs)
        ids = torch.tensor([s.prompt + [0] * (width - len(s.prompt)) for s in seqs], device=self.device)
        rows = self._rows(seqs)
        chunk = max(1, self.prefill_tokens // len(seqs))
        h_last = [None] * len(seqs)
        for start in range(0, width, chunk):
            end = min(start + chunk, width)
            starts = [start] * len(seqs)
            h = self._forward(ids[:, start:end], rows, starts)  # right padding: causal attention never sees pads
            for i, s in enumerate(seqs):
                if start <= len(s.prompt) - 1 < end:
                    h_last[i] = h[i, len(s.prompt) - 1 - start].clone()
            known = min(end, width - 1)  # MTP covers the prompt: position t sees token t + 1
            if self.speculator and known > start:
                self.speculator.forward(h[:, : known - start], ids[:, start + 1 : known + 1], rows, starts)
        h_last = torch.stack(h_last)
        with self.compute.autocast():
            logits = self.model.lm_head(h_last).float()
        self.logits[rows] = logits  # the slots are still free: a failure before here leaves nothing behind
        for i, s in enumerate(seqs):
            s.mtp_states = [h_last[i]] if self.speculator else []

    def abort(self, seq_id):
        """Stop a sequence and free its slot (a client went away)."""
        s = self.running.pop(seq_id, None)
        if s is not None:
            s.finish_reason = s.finish_reason or "abort"
            self.free.append(s.slot)

    def warm_up(self):
        """Run the decode step for one sequence and for several, so it is compiled (seconds, once per
        process and shape; a one-slot engine's package once per machine, aot.py) before any request waits."""
        bos = self.tokenizer.bos_id if self.tokenizer is not None else self.model.config.bos_token_id
        stops, self.stop_ids = self.stop_ids, set()  # decode whatever comes, end of sequence included
        try:
            for n in sorted({1, min(2, self.max_batch)}):
                self.generate([[bos]] * n, SamplingParams(max_tokens=3, temperature=0))
        finally:
            self.stop_ids = stops
        if self.speculator:
            self.speculator.drafted = self.speculator.accepted = 0

    @property
    def idle(self):
        return not self.running

    @property
    def acceptance_rate(self):
        return self.speculator.acceptance_rate if self.speculator else 0.0

    # ------------------------------------------------------------------------- stepping

    @torch.no_grad()
    def step(self) -> list[Event]:
        """Sample the next token of every running sequence, then one forward for those that go on (and a prefill
        chunk for each one whose tool call was just answered)."""
        seqs = list(self.running.values())
        if not seqs:
            return []
        events = [self._emit(s, [token]) for s, token in zip(seqs, self._sample(seqs))]
        go_on = [s for s in seqs if s.finish_reason is None]
        answered = [s for s in go_on if s.forced[-1]]  # a tool's output was appended: its chunk, not a step
        if answered:
            self._prefill_forced(answered)
            go_on = [s for s in go_on if not s.forced[-1]]
        if not go_on:
            return events
        if self.speculator and all(s.params.greedy for s in go_on):
            return _merge(events + self._speculate(go_on))
        ints = torch.tensor([[s.tokens[-1], s.length, s.slot] for s in go_on], device=self.device)
        self.cache.reserve(max(s.length for s in go_on) + 1)
        if len(go_on) > 1:  # any batch size: one graph for 1 sequence, one for more
            torch._dynamo.maybe_mark_dynamic(ints, 0)
        with self.compute.autocast():
            h, logits = self.decode_step(self.model, ints, self.cache.latent, self.cache.rope)
        if self.max_batch == 1:  # the step's logits are the one slot's: kept, not copied
            self.logits = logits
        else:
            self.logits[ints[:, 2]] = logits
        if self.speculator:
            for i, s in enumerate(go_on):
                s.mtp_states.append(h[i, 0])
        return events

    def _speculate(self, seqs):
        """A speculative step of greedy sequences -> the events of the drafts that stood."""
        accepted, drafts, logits, next_logits = self.speculator.verify(seqs, [self._room(s) for s in seqs])
        rows = self._rows(seqs)
        self.logits[rows] = next_logits
        if not accepted:
            return []
        mine = [seqs[i] for i in accepted]
        if any(s.params.logprobs for s in mine):  # greedy: the drafts, with their log-probabilities
            self.logits[rows[accepted]] = logits[accepted, 0]
            tokens = self._sample(mine)
            self.logits[rows[accepted]] = logits[accepted, 1]
        else:
            tokens = [drafts[i] for i in accepted]
            for s, token in zip(mine, tokens):
                s.tokens.append(token)
                s.forced.append(False)
        return [self._emit(s, [t]) for s, t in zip(mine, tokens)]

    def _sample(self, seqs: list[Sequence]) -> list[int]:
        """The next token of every sequence, drawn together in one call with one host sync (two with
        logprobs); a seeded row's draw depends on its seed and token index only."""
        logits = self.logits if self.max_batch == 1 else self.logits[self._rows(seqs)]  # one slot: no gather
        tokens = sample_tokens(logits, [s.params for s in seqs], [len(s.tokens) for s in seqs], self.noise)
        picked = tokens.tolist()
        wants = [i for i, s in enumerate(seqs) if s.params.logprobs]
        if wants:
            logprobs = F.log_softmax(logits[wants], -1).gather(1, tokens[wants, None]).squeeze(1).tolist()
            for i, lp in zip(wants, logprobs):
                seqs[i].logprobs.append(lp)
        for s, token in zip(seqs, picked):
            s.tokens.append(token)
            s.forced.append(False)
        return picked

    def _emit(self, s: Sequence, new_tokens: list[int]) -> Event:
        """Run a tool the new tokens call, update the text, apply stop conditions, and return what is new for
        the client (a tool's output included)."""
        if new_tokens[-1] in self.stop_ids:
            s.finish_reason = "stop"
        elif self.tools and new_tokens[-1] == self.tokenizer.call_end_id:
            new_tokens = new_tokens + self._call_tool(s)
        if s.text_state.update(s.tokens, len(s.tokens) - (s.finish_reason == "stop")):
            s.finish_reason = "stop"
        if s.finish_reason is None and s.repeats is not None and any([s.repeats.add(t) for t in new_tokens]):
            s.finish_reason = "repetition"  # the text stays as generated
        if s.finish_reason is None and self._room(s) < 1:
            s.finish_reason = "length"
        finished = s.finish_reason is not None
        if finished:
            self.running.pop(s.id, None)
            self.free.append(s.slot)
        return Event(s, new_tokens, s.text_state.delta(finished), finished)

    def _call_tool(self, s):
        """Append the calculator's output for the call s just ended, as forced tokens -> them; none, and s
        finishes with "length", where they do not fit."""
        tok = self.tokenizer
        ids = s.prompt + s.tokens[:-1]
        begin = next((i for i in range(len(ids) - 1, -1, -1) if ids[i] == tok.call_begin_id), None)
        result = calculate(tok.decode(ids[begin + 1 :])) if begin is not None else "error: no call began"
        output = [tok.output_begin_id] + tok.encode(result) + [tok.output_end_id]
        if len(output) > self._room(s):
            s.finish_reason = "length"
            return []
        s.tokens += output
        s.forced += [True] * len(output)
        if s.params.logprobs:
            s.logprobs += [math.nan] * len(output)  # not drawn from the model: no log-probability
        return output

    def _prefill_forced(self, seqs):
        """Write each sequence's tokens the cache lacks, its call's end and the tool's output after it, as a
        prefill chunk at its position, one forward for the chunks of a length; a sequence's next logits are its
        chunk's last position's."""
        by_length = {}
        for s in seqs:
            n = 1 + next(i for i, forced in enumerate(reversed(s.forced)) if not forced)
            by_length.setdefault(n, []).append(s)
        for n, group in by_length.items():
            rows = self._rows(group)
            ids = torch.tensor([s.tokens[-n:] for s in group], device=self.device)  # (B, n)
            h = self._forward(ids, rows, [s.length - n + 1 for s in group])
            with self.compute.autocast():
                self.logits[rows] = self.model.lm_head(h[:, -1]).float()
            if self.speculator:  # the MTP module takes these positions at its next speculative step (catch_up)
                for s, states in zip(group, h):
                    s.mtp_states += list(states.unbind(0))

    def _room(self, s):
        """New tokens s may still take: its max_tokens, and the context (its next token needs a position)."""
        return min(s.params.max_tokens - len(s.tokens), self.max_len - s.length - 1)

    def _rows(self, seqs):
        return torch.tensor([s.slot for s in seqs], device=self.device)

    def _forward(self, ids, rows, starts):
        """decode_forward's hidden states over ids (B, T) written at positions starts[b] + t of the rows' slots
        (prefill)."""
        self.cache.reserve(max(starts) + ids.shape[1])
        starts = torch.tensor(starts, device=self.device)
        with self.compute.autocast():
            return decode_forward(self.model, ids, starts, rows, self.cache.latent, self.cache.rope)

    # ------------------------------------------------------------------------- whole requests

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        """Generate for every prompt (more than max_batch are queued); returns finished sequences in order."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        waiting = list(enumerate(zip(prompts, params)))
        done: dict[int, Sequence] = {}
        order: dict[int, int] = {}
        while waiting or self.running:
            if waiting and (len(self.free) >= self.refill or not self.running):
                batch, waiting = waiting[: len(self.free)], waiting[len(self.free) :]
                for (i, _), s in zip(batch, self.add([p for _, (p, _) in batch], [sp for _, (_, sp) in batch])):
                    order[s.id] = i
            for e in self.step():
                if e.finished and e.seq.id in order:
                    done[order[e.seq.id]] = e.seq
        return [done[i] for i in range(len(prompts))]

    def stream(self, prompt: list[int], params: SamplingParams):
        """Yield Events for one prompt as tokens arrive."""
        (seq,) = self.add([prompt], params)
        while seq.finish_reason is None:
            for e in self.step():
                if e.seq is seq:
                    yield e


class OneOrMore:
    """A step that runs `one` for a single sequence (its first input's batch of 1) and `more` for several."""

    def __init__(self, one, more):
        self.one, self.more = one, more

    def __call__(self, model, first, *rest):
        return (self.one if first.shape[0] == 1 else self.more)(model, first, *rest)


def _merge(events):
    """One event per sequence: a speculative step can produce two tokens for it."""
    merged: dict[int, Event] = {}
    for e in events:
        if e.seq.id in merged:
            m = merged[e.seq.id]
            merged[e.seq.id] = Event(e.seq, m.token_ids + e.token_ids, m.text + e.text, e.finished)
        else:
            merged[e.seq.id] = e
    return list(merged.values())
