"""MTP self-speculative decoding: the first MTP module drafts the token after each sequence's newest one, and
one forward of the main model over [newest, draft] verifies it, so greedy output is exactly plain decoding's.
Draft and verification run as one graph (speculative_step); the MTP module keeps its own latent cache, with
the engine's slots. The engine's Slots run a step of greedy sequences through it (verify) and hand it the main
model's hidden states of every position they write otherwise (prefill, joined, took).
"""

import torch

from nanoseek.kv_cache import LatentCache, forward_logits, layer_views


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
    hidden, logits = forward_logits(model, torch.stack([newest, drafts], 1), starts, rows, *caches)
    agrees = logits[:, 0].argmax(-1) == drafts
    next_logits = torch.where(agrees[:, None], logits[:, 1], logits[:, 0])
    return torch.stack([agrees.long(), drafts]), hidden, logits, next_logits


class Speculator:
    """The MTP module's cache, the main model's hidden states it has not taken yet (pending, per slot), and the
    speculative steps of an engine's greedy sequences (verify)."""

    def __init__(self, model, main_cache, compute, step=speculative_step, refused=()):
        """main_cache: the engine's LatentCache, whose slots and length the MTP module's cache keeps;
        step: speculative_step, compiled or not; refused: tokens whose drafts never stand (a tool call's end,
        which the engine must see sampled to run the tool): the next plain step samples them instead."""
        self.model, self.main_cache, self.compute = model, main_cache, compute
        latent, rope = main_cache.latent[0], main_cache.rope[0]
        self.cache = LatentCache(1, latent.shape[0], main_cache.max_len, latent.shape[2], rope.shape[2], latent.dtype,
                                 latent.device)
        self.step, self.refused = step, set(refused)
        self.pending: dict[int, list] = {}  # slot -> hidden states (D,) of positions whose MTP pass is to come
        self.drafted = self.accepted = 0

    @property
    def acceptance_rate(self):
        return self.accepted / self.drafted if self.drafted else 0.0

    def clear(self):
        """Nothing cached or pending (the engine is idle)."""
        self.cache.clear()
        self.pending.clear()

    def prefill(self, h, ids, rows, start):
        """The MTP module over a prefill chunk: main hidden states h (B, T, D) of positions start + t, of the
        prompts ids (B, width); the positions whose next token the prompt holds."""
        known = min(start + h.shape[1], ids.shape[1] - 1) - start  # position t sees token t + 1
        if known > 0:
            self.forward(h[:, :known], ids[:, start + 1 : start + 1 + known], rows, [start] * len(ids))

    def joined(self, seqs, h_last):
        """Sequences whose prompts are prefilled; h_last (B, D): their last position's hidden states."""
        for s, h in zip(seqs, h_last):
            self.pending[s.slot] = [h]

    def took(self, seqs, h):
        """The main model wrote positions of seqs outside a speculative step: their hidden states h (B, T, D)."""
        for s, states in zip(seqs, h):
            self.pending[s.slot] += states.unbind(0)

    def forward(self, h, next_ids, rows, starts):
        """The MTP module over (B, T) positions: main hidden states h and the tokens after them."""
        self.cache.reserve(self.main_cache.length)  # as long as the main cache, which holds these positions
        starts = torch.tensor(starts, device=h.device)
        with self.compute.autocast():
            draft_forward(self.model, h, next_ids, starts, rows, self.cache.latent[0], self.cache.rope[0])

    def catch_up(self, s):
        """Bring the MTP cache of s to its newest position but one, as after a speculative step (eager)."""
        states = self.pending[s.slot]
        n = len(states) - 1
        ids = torch.tensor([s.tokens[-n - 1 : -1]], device=states[0].device)
        self.forward(torch.stack(states[:n])[None], ids, torch.tensor([s.slot], device=ids.device),
                     [s.length - n - 1])
        self.pending[s.slot] = states[n:]

    def verify(self, seqs, rooms):
        """One speculative step of greedy sequences; rooms: the new tokens each may still take. -> the indices of
        the seqs whose draft stands and fits, every row's draft, the verification's logits (B, 2, V) and each
        row's next logits (B, V): those after its draft where that stands and fits, else after its newest."""
        for s in seqs:
            if len(self.pending[s.slot]) > 2:  # plain steps ran while a sampled sequence shared the batch
                self.catch_up(s)
        states = [self.pending[s.slot] for s in seqs]
        counts = [len(p) for p in states]  # positions whose next token is known, not yet in MTP's cache
        width = 2  # 1 after a rejected draft, 2 after an accepted one: always 2, so the graph's shape is fixed;
        pad = [width - n for n in counts]  # a row with one repeats it (its copy is overwritten a step later)
        h_prev = torch.stack([torch.stack(p + p[-1:] * k) for p, k in zip(states, pad)])
        self.main_cache.reserve(max(s.length for s in seqs) + 2)
        self.cache.reserve(self.main_cache.length)  # the MTP module writes positions length - pending + 0, 1
        # per row: the tokens after the pending positions, where they start, the one to draft from, the newest
        # token, its position and the slot; one tensor, its columns the step's inputs
        ints = torch.tensor([s.tokens[-n:] + s.tokens[-1:] * p + [s.length - n, n - 1, s.tokens[-1], s.length, s.slot]
                             for s, n, p in zip(seqs, counts, pad)], device=h_prev.device)
        next_ids, (draft_starts, last, newest, starts, rows) = ints[:, :width], ints[:, width:].unbind(1)
        tensors = (h_prev, next_ids, draft_starts, last, newest, starts, rows)
        if len(seqs) > 1:  # any batch size: one graph for 1 sequence, one for more
            for t in tensors:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        caches = (self.main_cache.latent, self.main_cache.rope), (self.cache.latent[0], self.cache.rope[0])
        with self.compute.autocast():
            verdict, h, logits, next_logits = self.step(self.model, *tensors, *caches)
        agrees, drafts = verdict.tolist()  # the one host sync
        accepted = [i for i, (agree, room, draft) in enumerate(zip(agrees, rooms, drafts))
                    if agree and room > 1 and draft not in self.refused]
        self.drafted += len(seqs)
        self.accepted += len(accepted)
        for i, s in enumerate(seqs):
            self.pending[s.slot] = list(h[i].unbind(0)) if i in accepted else [h[i, 0]]
            if agrees[i] and i not in accepted:  # no room for the draft, or refused: the row goes on from its newest
                next_logits[i] = logits[i, 0]
        return accepted, drafts, logits, next_logits
