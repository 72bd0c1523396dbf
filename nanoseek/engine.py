"""One engine for every generation: RL rollouts, evaluation, chat and the server.

Sequences live in slots of a latent KV cache (kv_lora_rank + qk_rope_head_dim numbers per token and
layer). A step samples one token for every running sequence and runs one batched forward, compiled into
one graph (`decode_step`); sequences join (`add`, a chunked eager prefill) and leave between steps, which
is all continuous batching needs. With an MTP module and greedy decoding, a speculative step drafts one
more token with the MTP module and verifies it in the same graph (Speculator, self-speculative decoding):
the output is exactly what plain greedy decoding gives. On by default in an engine of one sequence on a CPU
while most drafts stand: on the cpu model's own tasks 98-99% of them do, and its decode steps run ~1.3x plain
decoding at batch 1, 1.0x at batch 16 (docs/BENCHMARKS.md).

Sampling lives in sampling.py, a sequence's text (detokenising, stop strings, streaming) in text.py.
"""

import itertools
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nanoseek.device import policy
from nanoseek.model import DeepSeekV3
from nanoseek.sampling import SamplingParams, sample_tokens, seeded_noise
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
    tokens: list[int] = field(default_factory=list)  # generated
    logprobs: list[float] = field(default_factory=list)
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


class LatentCache:
    """Per layer: (slots, length, kv_lora_rank) latents and (slots, length, rope) keys, one tensor each (a
    compiled decode step writes them in place). The length grows in blocks to what the longest sequence
    held needs (prompt + new tokens), up to max_len, never more."""

    GROW = 128  # positions added at a time

    def __init__(self, n_layers, slots, max_len, latent_dim, rope_dim, dtype, device):
        self.max_len = max_len
        self.latent = [torch.zeros(slots, 0, latent_dim, dtype=dtype, device=device) for _ in range(n_layers)]
        self.rope = [torch.zeros(slots, 0, rope_dim, dtype=dtype, device=device) for _ in range(n_layers)]

    @property
    def length(self):  # positions each slot has room for
        return self.latent[0].shape[1]

    def reserve(self, length):
        """Room for positions 0 .. length - 1 in every slot."""
        if length > self.max_len:
            raise ValueError(f"position {length - 1} is past the engine's context of {self.max_len} tokens")
        if length > self.length:
            more = min(self.max_len, -(-length // self.GROW) * self.GROW) - self.length
            self.latent = [F.pad(t, (0, 0, 0, more)) for t in self.latent]
            self.rope = [F.pad(t, (0, 0, 0, more)) for t in self.rope]
            for t in self.latent + self.rope:  # a compiled step takes any length, so growing compiles nothing
                torch._dynamo.maybe_mark_dynamic(t, 1)

    def clear(self):
        """Length 0 again (between requests): attention reads every cached position, so a cache left as long
        as an earlier, longer request would make every later step pay for it."""
        self.latent = [t.new_zeros(t.shape[0], 0, t.shape[2]) for t in self.latent]
        self.rope = [t.new_zeros(t.shape[0], 0, t.shape[2]) for t in self.rope]

    def bytes_per_token(self):
        return len(self.latent) * (self.latent[0].shape[-1] + self.rope[0].shape[-1]) * self.latent[0].element_size()


class _LayerView:
    """One layer's slice of the cache for a forward over `rows` (slot ids) whose chunks start at `starts`;
    the engine reserves room first, so a write needs no host sync and keeps every shape fixed."""

    def __init__(self, latent, rope, rows, starts):
        self.latent, self.rope, self.rows, self.starts = latent, rope, rows, starts

    def write(self, latent, k_pe):
        pos = self.starts[:, None] + torch.arange(latent.shape[1], device=latent.device)  # (B, T)
        self.latent.index_put_((self.rows[:, None], pos), latent.to(self.latent.dtype))
        self.rope.index_put_((self.rows[:, None], pos), k_pe.to(self.rope.dtype))
        L = self.latent.shape[1]
        mask = torch.arange(L, device=latent.device) <= pos[..., None]  # (B, T, L): causal over the cache
        return self.latent[self.rows], self.rope[self.rows], mask


def layer_views(latent, rope, rows, starts):
    for t in latent + rope:  # every layer's cache is one length: one size for a compiled step to pass, not one a layer
        torch._check(t.shape[1] == latent[0].shape[1])
    return [_LayerView(lat, k_pe, rows, starts) for lat, k_pe in zip(latent, rope)]


def decode_forward(model, ids, starts, rows, latent, rope):
    """Hidden states (B, T, D) of ids (B, T) at positions starts (B,) + t, reading and writing the slots
    `rows` of the per-layer caches: latent, a list of (slots, L, C), and rope, a list of (slots, L, R)."""
    positions = starts[:, None] + torch.arange(ids.shape[1], device=ids.device)
    return model.forward_cached(ids, positions, layer_views(latent, rope, rows, starts))


def decode_step(model, ids, starts, rows, latent, rope):
    """decode_forward, then the output head: hidden states (B, T, D) and float logits (B, T, V)."""
    h = decode_forward(model, ids, starts, rows, latent, rope)
    return h, model.lm_head(h).float()


def draft_forward(model, h, next_ids, starts, rows, latent, rope):
    """The first MTP module over (B, T) positions at starts (B,) + t: main hidden states h (B, T, D) and the
    tokens after them (B, T), read from and written into its cache (latent, rope: one layer's tensors) ->
    its normed hidden states (B, T, D)."""
    positions = starts[:, None] + torch.arange(h.shape[1], device=h.device)
    cos, sin = model.rope_cos[positions], model.rope_sin[positions]
    (view,) = layer_views([latent], [rope], rows, starts)
    return model.mtp[0](h, model.model.embed_tokens(next_ids), cos, sin, None, view)[1]


def speculative_step(model, h, next_ids, draft_starts, last, newest, starts, rows, caches, draft_cache):
    """One self-speculative greedy step in one graph: the MTP module catches up on the positions whose next
    token is known (h, next_ids: (B, T) from draft_starts), drafts the token after each row's newest from its
    position `last` (B,), and the main model runs over [newest, draft] (B, 2) at starts. -> verdict (2, B):
    whether logits[:, 0] agree with the draft (the draft stands) and the draft; hidden states (B, 2, D);
    float logits (B, 2, V); and each row's next logits (B, V), those after the draft where it stands."""
    torch._check(draft_cache[0].shape[1] == caches[0][0].shape[1])  # one cache length: one size to pass
    normed = draft_forward(model, h, next_ids, draft_starts, rows, *draft_cache)
    drafts = model.lm_head(normed[torch.arange(h.shape[0], device=h.device), last]).argmax(-1)
    hidden, logits = decode_step(model, torch.stack([newest, drafts], 1), starts, rows, *caches)
    agrees = logits[:, 0].argmax(-1) == drafts
    next_logits = torch.where(agrees[:, None], logits[:, 1], logits[:, 0])
    return torch.stack([agrees.long(), drafts]), hidden, logits, next_logits


def compile_options(device):
    """torch.compile arguments for the decode step (batch and cache length are marked dynamic where the
    engine makes them): on a CPU the generated C++ calls its kernels directly, no Python between them."""
    return {"options": {"cpp_wrapper": device.type == "cpu"}}


class Engine:
    """Slots of a latent cache, sequences joining and leaving them, and one compiled forward a step."""

    def __init__(self, model: DeepSeekV3, tokenizer, max_batch=16, max_len=None, speculative=None, compile=None,
                 dtype=None):
        """dtype: the compute dtype, auto (bfloat16 on a GPU, float32 on a CPU), bfloat16 or float32. The
        engine runs the model under its autocast and keeps its latent cache in it; callers wrap nothing.
        speculative: MTP self-speculation for greedy steps, True always, False never, None (the default) where
        it was measured to pay: in an engine of one sequence (chat) on a CPU with an MTP module, while more
        than half of the recent drafts stand (Speculator.worth_it), compiled at its first step. A speculative
        step yields 1 + acceptance tokens for ~1.5x a plain step's time at batch 1 and gains nothing at 16
        (docs/BENCHMARKS.md); on a GPU it has not been measured."""
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
        compile = COMPILE if compile is None else compile
        self.decode_step = torch.compile(decode_step, **compile_options(self.device)) if compile else decode_step
        # the seeded draws' integer hashing, compiled at the first seeded draw (chat never makes one)
        self.noise = torch.compile(seeded_noise, dynamic=True) if compile else seeded_noise
        adaptive = speculative is None  # by default where measured faster: one sequence, on a CPU
        speculative = max_batch == 1 and self.device.type == "cpu" if adaptive else speculative
        self.speculator = Speculator(model, self.cache, self.compute, self.device if compile else None, adaptive) \
            if speculative and len(model.mtp) else None
        if compile:
            self.warm_up()

    prefill_tokens = 2048  # tokens (prompts x positions) per prefill forward: bounds its activations

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
        process and shape) before any request waits on it."""
        bos = self.tokenizer.bos_id if self.tokenizer is not None else self.model.config.bos_token_id
        stops, self.stop_ids = self.stop_ids, set()  # decode whatever comes, end of sequence included
        speculator = self.speculator
        if speculator is not None and speculator.adaptive:
            self.speculator = None  # compiled at its first step, so sampled chats never wait for it
        try:
            for n in sorted({1, min(2, self.max_batch)}):
                self.generate([[bos]] * n, SamplingParams(max_tokens=3, temperature=0))
        finally:
            self.stop_ids, self.speculator = stops, speculator
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
        """Sample the next token of every running sequence, then one forward for those that go on."""
        seqs = list(self.running.values())
        if not seqs:
            return []
        events = [self._emit(s, [token]) for s, token in zip(seqs, self._sample(seqs))]
        go_on = [s for s in seqs if s.finish_reason is None]
        if not go_on:
            return events
        if self.speculator and all(s.params.greedy for s in go_on) and self.speculator.worth_it():
            return _merge(events + self.speculator.verify(self, go_on))
        ids = torch.tensor([[s.tokens[-1]] for s in go_on], device=self.device)
        rows = self._rows(go_on)
        h, logits = self._forward(ids, rows, self._starts(go_on), self.decode_step)
        self.logits[rows] = logits[:, 0]
        if self.speculator:
            for i, s in enumerate(go_on):
                s.mtp_states.append(h[i, 0])
        return events

    def _sample(self, seqs: list[Sequence]) -> list[int]:
        """The next token of every sequence, drawn together in one call with one host sync (two with
        logprobs); a seeded row's draw depends on its seed and token index only."""
        logits = self.logits[self._rows(seqs)]
        tokens = sample_tokens(logits, [s.params for s in seqs], [len(s.tokens) for s in seqs], self.noise)
        picked = tokens.tolist()
        wants = [i for i, s in enumerate(seqs) if s.params.logprobs]
        if wants:
            logprobs = F.log_softmax(logits[wants], -1).gather(1, tokens[wants, None]).squeeze(1).tolist()
            for i, lp in zip(wants, logprobs):
                seqs[i].logprobs.append(lp)
        for s, token in zip(seqs, picked):
            s.tokens.append(token)
        return picked

    def _emit(self, s: Sequence, new_tokens: list[int]) -> Event:
        """Update the text, apply stop conditions, and return what is new for the client."""
        if new_tokens[-1] in self.stop_ids:
            s.finish_reason = "stop"
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

    def _room(self, s):
        """New tokens s may still take: its max_tokens, and the context (its next token needs a position)."""
        return min(s.params.max_tokens - len(s.tokens), self.max_len - s.length - 1)

    def _rows(self, seqs):
        return torch.tensor([s.slot for s in seqs], device=self.device)

    def _starts(self, seqs):
        return [s.length for s in seqs]

    def _forward(self, ids, rows, starts, run=decode_forward):
        """run(model, ids, starts, rows, caches) over ids (B, T) written at positions starts[b] + t of the
        rows' slots: decode_forward's hidden states (prefill), or decode_step's with logits (T <= 2)."""
        self.cache.reserve(max(starts) + ids.shape[1])
        starts = torch.tensor(starts, device=self.device)
        if len(starts) > 1:  # and any batch size: one graph for 1 sequence, one for more
            for t in (ids, starts, rows):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        with self.compute.autocast():
            return run(self.model, ids, starts, rows, self.cache.latent, self.cache.rope)

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


class Speculator:
    """Self-speculative decoding with the first MTP module, for greedy steps: it drafts the token after each
    sequence's newest one, and one forward of the main model over [newest, draft] verifies it, so the output
    is exactly plain greedy decoding's. Draft and verification run as one graph (speculative_step), compiled
    when the engine's decode step is; the MTP module keeps its own latent cache, with the engine's slots."""

    PROBE = 32  # plain steps between tries while too few drafts stand

    def __init__(self, model, main_cache, compute, compile_for=None, adaptive=False):
        """main_cache: the engine's LatentCache, whose slots and length the MTP module's cache keeps;
        compile_for: the device to compile the step for (None: eager); adaptive: speculate only while it pays
        (worth_it)."""
        self.model, self.main_cache, self.compute, self.adaptive = model, main_cache, compute, adaptive
        latent, rope = main_cache.latent[0], main_cache.rope[0]
        self.cache = LatentCache(1, latent.shape[0], main_cache.max_len, latent.shape[2], rope.shape[2], latent.dtype,
                                 latent.device)
        self.step = speculative_step if compile_for is None else \
            torch.compile(speculative_step, **compile_options(compile_for))
        self.drafted = self.accepted = 0
        self.recent, self.waited = 1.0, 0  # drafts that stood, a moving average; plain steps since the last try

    def worth_it(self):
        """Whether to speculate this step: always, or where adaptive while more than half the recent drafts
        stood (a step yields 1 + acceptance tokens for ~1.5x a plain step's time), and once every PROBE steps
        when they did not, to notice when they would again."""
        if not self.adaptive or self.recent > 0.5:
            return True
        self.waited = (self.waited + 1) % self.PROBE
        return self.waited == 0

    @property
    def acceptance_rate(self):
        return self.accepted / self.drafted if self.drafted else 0.0

    def forward(self, h, next_ids, rows, starts):
        """The MTP module over a prefill's (B, T) positions: main hidden states h and the tokens after them."""
        self.cache.reserve(self.main_cache.length)  # as long as the main cache, which holds these positions
        starts = torch.tensor(starts, device=h.device)
        with self.compute.autocast():
            draft_forward(self.model, h, next_ids, starts, rows, self.cache.latent[0], self.cache.rope[0])

    def catch_up(self, s):
        """Bring the MTP cache of s to its newest position but one, as after a speculative step (eager)."""
        n = len(s.mtp_states) - 1
        ids = torch.tensor([s.tokens[-n - 1 : -1]], device=s.mtp_states[0].device)
        self.forward(torch.stack(s.mtp_states[:n])[None], ids, torch.tensor([s.slot], device=ids.device),
                     [s.length - n - 1])
        s.mtp_states = s.mtp_states[n:]

    def verify(self, engine, seqs):
        """One speculative step of the engine's greedy sequences -> the events of the drafts it accepted."""
        for s in seqs:
            if len(s.mtp_states) > 2:  # plain steps ran while a sampled sequence shared the batch
                self.catch_up(s)
        pending = [len(s.mtp_states) for s in seqs]  # positions whose next token is known, not yet in MTP's cache
        width = 2  # 1 after a rejected draft, 2 after an accepted one: always 2, so the graph's shape is fixed;
        pad = [width - n for n in pending]  # a row with one repeats it (its copy is overwritten a step later)
        h_prev = torch.stack([torch.stack(s.mtp_states + s.mtp_states[-1:] * p) for s, p in zip(seqs, pad)])
        starts = engine._starts(seqs)
        engine.cache.reserve(max(starts) + 2)
        self.cache.reserve(engine.cache.length)  # the MTP module writes positions length - pending + 0, 1
        # per row: the tokens after the pending positions, where they start, the one to draft from, the newest
        # token, its position and the slot; one tensor, its columns the step's inputs
        ints = torch.tensor([s.tokens[-n:] + s.tokens[-1:] * p + [s.length - n, n - 1, s.tokens[-1], start, s.slot]
                             for s, n, p, start in zip(seqs, pending, pad, starts)], device=engine.device)
        next_ids, (draft_starts, last, newest, starts, rows) = ints[:, :width], ints[:, width:].unbind(1)
        tensors = (h_prev, next_ids, draft_starts, last, newest, starts, rows)
        if len(seqs) > 1:  # any batch size: one graph for 1 sequence, one for more
            for t in tensors:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        with self.compute.autocast():
            verdict, h, logits, next_logits = self.step(self.model, *tensors, (engine.cache.latent, engine.cache.rope),
                                                        (self.cache.latent[0], self.cache.rope[0]))
        agrees, drafted = verdict.tolist()  # the one host sync
        accepted = [i for i, (s, agree) in enumerate(zip(seqs, agrees)) if agree and engine._room(s) > 1]
        self.drafted += len(seqs)
        self.accepted += len(accepted)
        self.recent += 0.2 * (len(accepted) / len(seqs) - self.recent)
        engine.logits[rows] = next_logits
        for i, s in enumerate(seqs):
            s.mtp_states = list(h[i].unbind(0)) if i in accepted else [h[i, 0]]
            if agrees[i] and i not in accepted:  # no room for the draft: the row goes on from its newest token
                engine.logits[s.slot] = logits[i, 0]
        if not accepted:
            return []
        mine = [seqs[i] for i in accepted]
        if any(s.params.logprobs for s in mine):
            engine.logits[rows[accepted]] = logits[accepted, 0]
            tokens = engine._sample(mine)  # greedy: the drafts, with their log-probabilities
            engine.logits[rows[accepted]] = logits[accepted, 1]
        else:
            tokens = [drafted[i] for i in accepted]
            for s, token in zip(mine, tokens):
                s.tokens.append(token)
        return [engine._emit(s, [t]) for s, t in zip(mine, tokens)]


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
