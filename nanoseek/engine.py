"""One engine for every generation: RL rollouts, evaluation, chat and the server.

Sequences live in slots of a latent KV cache (kv_lora_rank + qk_rope_head_dim numbers per token and
layer). A step samples one token for every running sequence and runs one batched forward, compiled into
one graph (`decode_step`); sequences join (`add`, a chunked eager prefill) and leave between steps, which
is all continuous batching needs. With speculative=True, MTP modules and greedy decoding, each step drafts
one more token with the MTP module and verifies it in the same forward (self-speculative decoding): the
output is exactly what plain greedy decoding gives (off by default: slower than the compiled plain step on
every checkpoint measured, docs/BENCHMARKS.md).
"""

import itertools
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nanoseek.device import policy
from nanoseek.model import DeepSeekV3

COMPILE = os.environ.get("NANOSEEK_COMPILE", "1") != "0"  # compile the decode step; NANOSEEK_COMPILE=0: eager
COMPILE_NOTE = "compiling the decode step (seconds, once; NANOSEEK_COMPILE=0 decodes without)"
MAX_PERIOD = 32  # longest block (in tokens) the repetition stop looks for
DEFAULT_REPETITION_STOP = 64  # chat and the server: a block repeated back to back over 64 tokens ends the turn


class EngineFull(RuntimeError):
    """Every slot is taken; try again when a sequence finishes."""


@dataclass
class SamplingParams:
    max_tokens: int = 256  # new tokens at most
    temperature: float = 1.0  # 0 picks the most likely token
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # nucleus sampling mass
    stop: tuple[str, ...] = ()  # stop strings; the text ends before the first one
    seed: int | None = None  # same seed, same output
    logprobs: bool = False  # keep each new token's log-probability (temperature 1)
    # N > 0: finish with "repetition" once the new tokens end in a block of 1 .. MAX_PERIOD tokens repeated
    # back to back (at least twice) over at least N tokens (RepetitionStop); 0: off (eval and GRPO)
    repetition_stop: int = 0

    def validate(self):
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("temperature must be >= 0, top_p in (0, 1], top_k >= 0")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in 0 .. 2**64 - 1 (got {self.seed})")
        if self.repetition_stop < 0:
            raise ValueError(f"repetition_stop must be >= 0 (0 turns it off; got {self.repetition_stop})")


class RepetitionStop:
    """Says when the tokens fed to it end in a block of n <= MAX_PERIOD tokens repeated back to back, at
    least twice, over at least `threshold` tokens. Per period n it keeps the run of trailing tokens that equal
    the token n before them (the block plus that run is periodic), so a token costs MAX_PERIOD comparisons."""

    def __init__(self, threshold):
        self.threshold = threshold
        self.recent: list[int] = []  # the last MAX_PERIOD tokens, newest last
        self.runs = [0] * MAX_PERIOD  # runs[n - 1]: trailing tokens equal to the token n before them

    def add(self, token) -> bool:
        """Take the next token; True when the tokens now end in such a repetition."""
        recent = self.recent
        self.runs = [r + 1 if n <= len(recent) and recent[-n] == token else 0 for n, r in enumerate(self.runs, 1)]
        recent.append(token)
        if len(recent) > MAX_PERIOD:
            del recent[0]
        return any(r + n >= max(self.threshold, 2 * n) for n, r in enumerate(self.runs, 1))


@dataclass
class Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    slot: int
    tokens: list[int] = field(default_factory=list)  # generated
    logprobs: list[float] = field(default_factory=list)
    text: str = ""  # decoded generated text, cut at a stop string
    decoded: int = 0  # tokens whose text is final, decoded_text (the others may end inside a UTF-8 character)
    decoded_text: str = ""
    sent: int = 0  # characters of text already streamed
    finish_reason: str | None = None  # "stop", "length", "repetition" or "abort"
    generator: torch.Generator | None = None
    next_logits: torch.Tensor | None = None  # (vocab,) for the next token
    mtp_states: list = field(default_factory=list)  # main hidden states of positions the MTP cache lacks
    repeats: RepetitionStop | None = None  # with params.repetition_stop > 0

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

    def views(self, rows, starts):
        """Per-layer writers for a forward over `rows` (slot ids) whose chunks start at `starts`."""
        return layer_views(self.latent, self.rope, rows, starts)

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


def compile_options(device):
    """torch.compile arguments for the decode step (batch and cache length are marked dynamic where the
    engine makes them): on a CPU the generated C++ calls its kernels directly, no Python between them."""
    return {"options": {"cpp_wrapper": device.type == "cpu"}}


class Engine:
    def __init__(self, model: DeepSeekV3, tokenizer, max_batch=16, max_len=None, speculative=False, compile=None,
                 dtype=None):
        """dtype: the compute dtype, auto (bfloat16 on a GPU, float32 on a CPU), bfloat16 or float32. The
        engine runs the model under its autocast and keeps its latent cache in it; callers wrap nothing."""
        self.model, self.tokenizer = model.eval(), tokenizer
        cfg = model.config
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self.compute = policy(str(self.device), dtype)
        shape = (max_batch, self.max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, self.compute.dtype, self.device)
        self.cache = LatentCache(cfg.num_hidden_layers, *shape)
        self.speculative = speculative and len(model.mtp) > 0
        self.mtp_cache = LatentCache(1, *shape) if self.speculative else None
        self.free = list(range(max_batch - 1, -1, -1))
        self.running: dict[int, Sequence] = {}
        self.ids = itertools.count()
        self.stop_ids = {tokenizer.eos_id} if tokenizer is not None else {cfg.eos_token_id}
        self.drafted = self.accepted = 0  # speculative decoding counters
        compile = COMPILE if compile is None else compile
        self.decode_step = torch.compile(decode_step, **compile_options(self.device)) if compile else decode_step
        if compile:
            self.warm_up()

    prefill_tokens = 2048  # tokens (prompts x positions) per prefill forward: bounds its activations

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
        taken = len(self.free) - len(prompts)
        slots = self.free[taken:][::-1]  # the slots pop() would give, taken only once the prefill is done
        seqs = [Sequence(next(self.ids), list(prompt), sp, slot, generator=_generator(sp.seed),
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
            if self.speculative and known > start:
                self._mtp_forward(h[:, : known - start], ids[:, start + 1 : known + 1], rows, starts)
        h_last = torch.stack(h_last)
        with self.compute.autocast():
            logits = self.model.lm_head(h_last).float()
        for i, s in enumerate(seqs):
            s.next_logits = logits[i]
            s.mtp_states = [h_last[i]] if self.speculative else []

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
        try:
            for n in sorted({1, min(2, self.max_batch)}):
                self.generate([[bos]] * n, SamplingParams(max_tokens=3, temperature=0))
        finally:
            self.stop_ids = stops
        self.drafted = self.accepted = 0

    @property
    def idle(self):
        return not self.running

    # ------------------------------------------------------------------------- stepping

    @torch.no_grad()
    def step(self) -> list[Event]:
        """Sample the next token of every running sequence, then one forward for those that go on."""
        seqs = list(self.running.values())
        events = [self._emit(s, [token]) for s, token in zip(seqs, self._sample(seqs))]
        go_on = [s for s in seqs if s.finish_reason is None]
        if not go_on:
            return events
        if self.speculative and all(s.params.temperature < 1e-4 for s in go_on):
            return _merge(events + self._draft_and_verify(go_on))
        ids = torch.tensor([[s.tokens[-1]] for s in go_on], device=self.device)
        h, logits = self._forward(ids, self._rows(go_on), self._starts(go_on), self.decode_step)
        h, logits = h[:, 0], logits[:, 0]
        for i, s in enumerate(go_on):
            s.next_logits = logits[i]
            if self.speculative:
                s.mtp_states.append(h[i])
        return events

    def _draft_and_verify(self, seqs):
        """Greedy: draft the token after each sequence's newest one with the MTP module, then verify
        [newest, draft] in one forward of the main model; keep the draft where the model agrees."""
        # MTP catches up on the positions whose next token is now known, and drafts from the last one
        pending = [len(s.mtp_states) for s in seqs]
        width = max(pending)
        pad = [width - n for n in pending]  # rows with fewer pending positions repeat their last one
        h_prev = torch.stack([torch.stack(s.mtp_states + s.mtp_states[-1:] * p) for s, p in zip(seqs, pad)])
        next_ids = [s.tokens[-n:] + s.tokens[-1:] * p for s, n, p in zip(seqs, pending, pad)]
        next_ids = torch.tensor(next_ids, device=self.device)
        starts = [s.length - n for s, n in zip(seqs, pending)]
        h_mtp = self._mtp_forward(h_prev, next_ids, self._rows(seqs), starts)
        last = torch.tensor(pending, device=self.device) - 1
        with self.compute.autocast():
            drafts = self.model.lm_head(h_mtp[torch.arange(len(seqs)), last]).argmax(-1).tolist()
        ids = torch.tensor([[s.tokens[-1], d] for s, d in zip(seqs, drafts)], device=self.device)
        h, logits = self._forward(ids, self._rows(seqs), self._starts(seqs), self.decode_step)  # (B, 2, D), (B, 2, V)
        agrees = (logits[:, 0].argmax(-1) == torch.tensor(drafts, device=self.device)).tolist()
        events = []
        for i, (s, agree) in enumerate(zip(seqs, agrees)):
            self.drafted += 1
            s.next_logits, s.mtp_states = logits[i, 0], [h[i, 0]]
            if agree and self._room(s) > 1:
                self.accepted += 1
                events.append(self._emit(s, self._sample([s])))  # greedy: the sample is the draft
                s.next_logits, s.mtp_states = logits[i, 1], [h[i, 0], h[i, 1]]
        return events

    @property
    def acceptance_rate(self):
        return self.accepted / self.drafted if self.drafted else 0.0

    def _room(self, s):
        return min(s.params.max_tokens - len(s.tokens), self.max_len - s.length - 1)

    # ------------------------------------------------------------------------- pieces

    def _rows(self, seqs):
        return torch.tensor([s.slot for s in seqs], device=self.device)

    def _starts(self, seqs):
        return [s.length for s in seqs]

    def _forward(self, ids, rows, starts, run=decode_forward):
        """run(model, ids, starts, rows, caches) over ids (B, T) written at positions starts[b] + t of the
        rows' slots: decode_forward's hidden states (prefill), or decode_step's with logits (T <= 2)."""
        self.cache.reserve(max(starts) + ids.shape[1])
        starts = torch.tensor(starts, device=self.device)
        for t in (ids, starts, rows):  # and any batch size: one graph for 1 sequence, one for more
            torch._dynamo.maybe_mark_dynamic(t, 0)
        with self.compute.autocast():
            return run(self.model, ids, starts, rows, self.cache.latent, self.cache.rope)

    def _mtp_forward(self, h, next_ids, rows, starts):
        """MTP module over (B, T) positions: main hidden states h and the embeddings of the tokens after them."""
        module = self.model.mtp[0]
        self.mtp_cache.reserve(max(starts) + h.shape[1])
        starts = torch.tensor(starts, device=self.device)
        positions = starts[:, None] + torch.arange(h.shape[1], device=self.device)
        cos, sin = self.model.rope_cos[positions], self.model.rope_sin[positions]
        emb = self.model.model.embed_tokens(next_ids)
        with self.compute.autocast():
            _, normed = module(h, emb, cos, sin, None, self.mtp_cache.views(rows, starts)[0])
        return normed

    def _sample(self, seqs: list[Sequence]) -> list[int]:
        """The next token of every sequence, drawn together with one host sync (two with logprobs)."""
        logits = torch.stack([s.next_logits for s in seqs])
        tokens = sample_tokens(logits, [s.params for s in seqs], [s.generator for s in seqs])
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
        token = new_tokens[-1]
        if token in self.stop_ids:
            s.finish_reason = "stop"
            visible = len(s.tokens) - 1
        else:
            visible = len(s.tokens)
        checked = len(s.text)  # text before this is free of stop strings
        text = self._text(s, visible)
        for stop in s.params.stop:
            cut = text.find(stop, max(0, checked - len(stop) + 1))
            if cut != -1:
                text, s.finish_reason = text[:cut], "stop"
        if s.finish_reason is None and s.repeats is not None and any([s.repeats.add(t) for t in new_tokens]):
            s.finish_reason = "repetition"  # the text stays as generated
        if s.finish_reason is None and (len(s.tokens) >= s.params.max_tokens or s.length + 1 >= self.max_len):
            s.finish_reason = "length"
        s.text = text
        finished = s.finish_reason is not None
        safe = len(text) if finished else _safe_prefix(text, s.params.stop)
        delta, s.sent = text[s.sent : safe], max(s.sent, safe)
        if finished:
            self.running.pop(s.id, None)
            self.free.append(s.slot)
        return Event(s, new_tokens, delta, finished)

    def _text(self, s: Sequence, visible: int) -> str:
        """The text of s.tokens[:visible], decoding only the tokens since the last finished character (a
        byte-level token may end inside one), never the whole text again."""
        if self.tokenizer is None:
            return ""
        tail = self.tokenizer.decode(s.tokens[s.decoded : visible])
        if tail.endswith("\ufffd"):  # an unfinished character: its bytes are decoded again with the next token
            return s.decoded_text + tail
        s.decoded_text, s.decoded = s.decoded_text + tail, visible
        return s.decoded_text

    # ------------------------------------------------------------------------- whole requests

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        """Generate for every prompt (more than max_batch are queued); returns finished sequences in order."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        waiting = list(enumerate(zip(prompts, params)))
        done: dict[int, Sequence] = {}
        order: dict[int, int] = {}
        while waiting or self.running:
            if waiting and self.free:
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


def sample_tokens(logits, params, generators):
    """Next tokens (B,) from logits (B, V) on the device: the most likely where temperature < 1e-4, else
    a draw after temperature, top-k and top-p, by the exponential race (argmax of p / E with E ~ Exp(1)
    is a draw from p). A seeded row takes its noise from its own CPU generator: the same draws alone,
    in any batch and on any device."""
    if all(sp.temperature < 1e-4 for sp in params):
        return logits.argmax(-1)
    greedy = torch.tensor([sp.temperature < 1e-4 for sp in params], device=logits.device)
    temperature = torch.tensor([max(sp.temperature, 1e-4) for sp in params], device=logits.device)
    scaled = logits / temperature[:, None]
    if any(sp.top_k or sp.top_p < 1.0 for sp in params):
        scaled = _top_k_top_p(scaled, params)
    noise = torch.empty_like(scaled).exponential_()
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if seeded:
        draws = torch.stack([torch.empty(logits.shape[1]).exponential_(generator=generators[i]) for i in seeded])
        noise[seeded] = draws.to(logits.device, non_blocking=True)
    drawn = (scaled.softmax(-1) / noise).argmax(-1)
    return torch.where(greedy, logits.argmax(-1), drawn)


def _top_k_top_p(scaled, params):
    """scaled (B, V) with -inf outside each row's top_k (0: all) and then its nucleus of mass top_p; the most
    likely token always stays."""
    V = scaled.shape[1]
    top_k = torch.tensor([min(sp.top_k or V, V) for sp in params], device=scaled.device)
    top_p = torch.tensor([sp.top_p for sp in params], device=scaled.device, dtype=scaled.dtype)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    kth = sorted_logits.gather(1, top_k[:, None] - 1)
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(-1)
    drop = (probs.cumsum(-1) - probs >= top_p[:, None]) & (top_p < 1.0)[:, None]  # keep the smallest set
    drop[:, 0] = False  # reaching top_p, and always the most likely token, however small top_p is
    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return scaled.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def _generator(seed):
    return None if seed is None else torch.Generator().manual_seed(seed)


def _safe_prefix(text, stops):
    """Characters that can be sent now: hold back an unfinished UTF-8 character or a possible stop prefix."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text.endswith(stop[:k], 0, end):
                end -= k
                break
    return end


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
