"""One engine for every generation: RL rollouts, evaluation, chat and the server.

Sequences live in slots of a latent KV cache (kv_cache.py). A step samples one token for every running
sequence and runs one batched forward, the decode step, eager or compiled (steps.py); sequences join (`add`, a
chunked eager prefill) and leave between steps, which is all continuous batching needs.

Given a Speculator (speculative=True, with an MTP module), a step of greedy sequences drafts one more token
and verifies it in the same forward (speculation.py): the output is exactly plain greedy decoding's. Drafts of
a tool call's end never stand (the next plain step samples it), so speculative output stays plain greedy
decoding's with tools too.

Tools (tools.py): when a sequence samples the tool-call end token, the engine runs the calculator and appends
its output as forced tokens (no room: finish_reason "length"); they enter the cache as one prefill chunk
while the other sequences decode in the same step, and the sequence's next logits are the chunk's last. The
chunk is eager, so a step compiled ahead of time is untouched. A completion's text shows the markup as the
tokens' strings. With tools, a reply writes only the control tokens the chat template allows where it is
(template.py): no call in the answer, no second </think>. tools=False: every token is a token like any other.

Sampling lives in sampling.py, a sequence's text (detokenising, stop strings, streaming) in text.py.
"""

import itertools

import torch

from nanoseek.device import choose_compute
from nanoseek.model import DeepSeekV3
from nanoseek.sampling import SamplingParams
from nanoseek.sequence import Event, Sequence
from nanoseek.slots import Slots
from nanoseek.steps import COMPILE, COMPILE_NOTE
from nanoseek.template import FREE, control_ids, phase_after, template_masks
from nanoseek.text import RepetitionStop, TextStream

__all__ = ["COMPILE", "COMPILE_NOTE", "Engine", "EngineFull", "Event", "SamplingParams", "Sequence"]


class EngineFull(RuntimeError):
    """Every slot is taken; try again when a sequence finishes."""


class Engine:
    """Slots of a latent cache, sequences joining and leaving them, and one batched forward a step."""

    def __init__(self, model: DeepSeekV3, tokenizer, max_batch=16, max_len=None, speculative=False, compile=None,
                 dtype=None, ahead_of_time=None, tools=True):
        """dtype: the compute dtype, auto (bfloat16 on a GPU, float32 on a CPU), bfloat16 or float32; the engine
        runs the model under its autocast and keeps its cache in it, so callers wrap nothing. compile: compile
        the steps (default: NANOSEEK_COMPILE, on). ahead_of_time: steps of one sequence on a CPU in float32 run
        as packages compiled ahead of time (steps.compiler; default: for an engine of one slot, chat; a server
        passes True, as most of its steps are a lone request's). speculative: MTP self-speculation for greedy
        steps, with an MTP module; off by default, as it has not paid on a CPU (docs/BENCHMARKS.md,
        "Speculative decoding"). tools: run the calculator when a sequence writes a tool call, where the
        tokenizer has tool tokens; False decodes as transformers and llama.cpp do, for comparing tokens."""
        self.model, self.tokenizer = model.eval(), tokenizer
        cfg = model.config
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.max_batch = max_batch
        self.compute = choose_compute(str(next(model.parameters()).device), dtype)
        self.free = list(range(max_batch - 1, -1, -1))
        self.running: dict[int, Sequence] = {}
        self.ids = itertools.count()
        self.stop_ids = {tokenizer.eos_id} if tokenizer is not None else {cfg.eos_token_id}
        self.tools = tools and tokenizer is not None and tokenizer.tools
        compile = COMPILE if compile is None else compile
        # with tools, the chat template's control tokens are sampled under its masks, and their drafts never stand
        refused = control_ids(tokenizer) if self.tools else set()
        masks = template_masks(tokenizer, cfg.vocab_size, self.compute.device) if self.tools else None
        self.slots = Slots(model, self.compute, max_batch, self.max_len, compile, ahead_of_time, speculative, refused,
                           masks)
        self.cache, self.speculator = self.slots.cache, self.slots.speculator  # the Speculator, or None
        if compile:
            self.warm_up()

    prefill_tokens = 2048  # tokens (prompts x positions) per prefill forward: bounds its activations

    @property
    def idle(self):
        return not self.running

    @property
    def acceptance_rate(self):
        return self.speculator.acceptance_rate if self.speculator else 0.0

    # ------------------------------------------------------------------------- joining and leaving

    @torch.no_grad()
    def add(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        """Prefill prompts into free slots; they decode from the next step on. All or nothing: if any part
        fails, no slot is taken and nothing runs."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(prompts) > len(self.free):
            raise EngineFull(f"{len(self.running)} sequences are running and the engine holds {self.max_batch}")
        for prompt, sp in zip(prompts, params):
            check_request(prompt, sp, self.max_len)
        if not self.running:  # nothing cached is needed any more
            self.slots.clear()
        taken = len(self.free) - len(prompts)
        slots = self.free[taken:][::-1]  # the slots pop() would give, taken only once the prefill is done
        seqs = [Sequence(next(self.ids), list(prompt), sp, slot, text_state=TextStream(self.tokenizer, sp.stop),
                         repeats=RepetitionStop(sp.repetition_stop) if sp.repetition_stop else None,
                         phase=phase_after(prompt, self.tokenizer) if self.tools else FREE)
                for prompt, sp, slot in zip(prompts, params, slots)]
        self.slots.prefill(seqs, self.prefill_tokens)
        del self.free[taken:]
        for s in seqs:
            self.running[s.id] = s
        return seqs

    def abort(self, seq_id):
        """Stop a sequence and free its slot (a client went away)."""
        s = self.running.pop(seq_id, None)
        if s is not None:
            s.finish_reason = s.finish_reason or "abort"
            self.free.append(s.slot)

    def warm_up(self):
        """Run the steps for one sequence and for several, so they are compiled (seconds, once per process and
        shape; a one-slot engine's packages once per machine, aot.py) before any request waits."""
        bos = self.tokenizer.bos_id if self.tokenizer is not None else self.model.config.bos_token_id
        stops, self.stop_ids = self.stop_ids, set()  # decode whatever comes, end of sequence included
        try:
            for n in sorted({1, min(2, self.max_batch)}):
                self.generate([[bos]] * n, SamplingParams(max_tokens=3, temperature=0))
        finally:
            self.stop_ids = stops
        if self.speculator:
            self.speculator.drafted = self.speculator.accepted = 0

    # ------------------------------------------------------------------------- stepping

    @torch.no_grad()
    def step(self) -> list[Event]:
        """Sample the next token of every running sequence, then one forward for those that go on (and a prefill
        chunk for each one whose tool call was just answered)."""
        seqs = list(self.running.values())
        if not seqs:
            return []
        events = [self._emit(s, token, lp) for s, token, lp in zip(seqs, *self.slots.sample(seqs))]
        go_on = [s for s in seqs if s.finish_reason is None]
        answered = [s for s in go_on if s.forced[-1]]  # a tool's output was appended: its chunk, not a step
        if answered:
            self.slots.prefill_forced(answered)
            go_on = [s for s in go_on if not s.forced[-1]]
        if not go_on:
            return events
        if self.slots.speculates(go_on):  # a draft that stands is a second token in this step
            stood, tokens, logprobs = self.slots.speculate(go_on, [s.room(self.max_len) for s in go_on])
            return _merge(events + [self._emit(go_on[i], t, lp) for i, t, lp in zip(stood, tokens, logprobs)])
        self.slots.decode(go_on)
        return events

    def _emit(self, s: Sequence, token: int, logprob: float | None) -> Event:
        """s takes the model's token (Sequence.take); a finished s leaves its slot -> what is new for the client
        (a tool's output included)."""
        new_tokens = s.take(token, logprob, self.stop_ids, self.max_len, self.tokenizer if self.tools else None)
        if self.tools:
            s.phase = phase_after(new_tokens, self.tokenizer, s.phase)
        finished = s.finish_reason is not None
        if finished:
            self.running.pop(s.id, None)
            self.free.append(s.slot)
        return Event(s, new_tokens, s.text_state.delta(finished), finished)

    # ------------------------------------------------------------------------- whole requests

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        """Generate for every prompt (more than max_batch are queued); returns finished sequences in order."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        waiting, seqs = list(zip(prompts, params)), []
        refill = max(1, self.max_batch // 4)  # free slots to wait for: a prefill takes several prompts at once
        while waiting or self.running:
            if waiting and (len(self.free) >= refill or not self.running):
                batch, waiting = waiting[: len(self.free)], waiting[len(self.free) :]
                seqs += self.add([p for p, _ in batch], [sp for _, sp in batch])
            self.step()
        return seqs

    def stream(self, prompt: list[int], params: SamplingParams):
        """Yield Events for one prompt as tokens arrive."""
        (seq,) = self.add([prompt], params)
        while seq.finish_reason is None:
            for e in self.step():
                if e.seq is seq:
                    yield e


def check_request(prompt, params, max_len):
    """ValueError where a prompt and its settings cannot run in a context of max_len tokens."""
    params.validate()
    if not prompt:
        raise ValueError("the prompt is empty")
    if len(prompt) >= max_len:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {max_len}, "
                         "so shorten it to leave room for an answer")


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
