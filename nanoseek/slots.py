"""The model's side of the engine, its slots: per slot, the latent cache of the sequence in it and that
sequence's next-token logits; the forwards that write them (a chunked prefill of prompts, the decode step,
chunks of forced tokens, and with a Speculator the speculative step of greedy sequences); and the draws from
them. The steps run eager or compiled as steps.compiler makes them.

A sequence here is the engine's Sequence: its prompt, tokens, forced flags, params, slot and length.
"""

import torch
import torch.nn.functional as F

from nanoseek.kv_cache import LatentCache, decode_forward
from nanoseek.sampling import sample_tokens, seeded_noise
from nanoseek.speculation import Speculator, speculative_step
from nanoseek.steps import compiler, decode_step


class Slots:
    """Each slot's cache and next logits, advanced by the forwards below; a Speculator, where there is one,
    takes the main model's hidden states of every position they write."""

    def __init__(self, model, compute, slots, max_len, compile=False, ahead_of_time=None, speculative=False,
                 refused=(), masks=None):
        """compute: the device.Compute the model runs under; compile, ahead_of_time: how the steps run
        (steps.compiler); speculative: speculate on greedy steps, with the model's first MTP module; refused:
        tokens whose drafts never stand (Speculator); masks: (phases, V) bool, the tokens a sequence's phase
        forbids (template.template_masks), or None."""
        cfg = model.config
        self.model, self.compute = model, compute
        self.device = next(model.parameters()).device
        self.cache = LatentCache(cfg.num_hidden_layers, slots, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                                 compute.dtype, self.device)
        self.logits = torch.zeros(slots, cfg.vocab_size, device=self.device)  # (slots, V)
        self.masks = masks
        build = compiler(model, compute, slots, compile, ahead_of_time)
        self.decode_step = build(decode_step)
        # the seeded draws' integer hashing, compiled at the first seeded draw (chat never makes one)
        self.noise = torch.compile(seeded_noise, dynamic=True) if compile else seeded_noise
        self.speculator = (Speculator(model, self.cache, compute, build(speculative_step), refused)
                           if speculative and len(model.mtp) else None)

    def clear(self):
        """Nothing cached (no sequence runs)."""
        self.cache.clear()
        if self.speculator:
            self.speculator.clear()

    def sample(self, seqs):
        """The next token of every sequence, drawn together in one call with one host sync (two with logprobs); a
        seeded row's draw depends on its seed and token index only -> the tokens and their log-probabilities."""
        logits = self.logits if len(self.logits) == 1 else self.logits[[s.slot for s in seqs]]  # one slot: kept
        if self.masks is not None:
            forbidden = self.masks[torch.tensor([s.phase for s in seqs], device=self.device)]  # (B, V)
            logits = logits.masked_fill(forbidden, float("-inf"))
        tokens = sample_tokens(logits, [s.params for s in seqs], [len(s.tokens) for s in seqs], self.noise).tolist()
        return tokens, logprobs(seqs, tokens, logits)

    def _keep(self, rows, logits):
        """Set the next logits (B, V) of the slots rows (B,). One slot: the tensor kept, not copied."""
        if len(self.logits) == 1:
            self.logits = logits
        else:
            self.logits[rows] = logits

    def prefill(self, seqs, budget):
        """Write the prompts into their slots' cache in forwards of at most `budget` tokens (rows x positions), so
        peak memory stays bounded however long the prompts; sets each one's next logits. The slots are written
        only at the end: a failure before leaves nothing behind (they are free)."""
        rows_per_forward = max(1, budget // max(len(s.prompt) for s in seqs)) if seqs else 1
        for i in range(0, len(seqs), rows_per_forward):
            self._prefill_rows(seqs[i : i + rows_per_forward], budget)

    def _prefill_rows(self, seqs, budget):
        width = max(len(s.prompt) for s in seqs)
        ids = torch.tensor([s.prompt + [0] * (width - len(s.prompt)) for s in seqs], device=self.device)
        rows = self.rows(seqs)
        chunk = max(1, budget // len(seqs))
        h_last = [None] * len(seqs)
        for start in range(0, width, chunk):
            end = min(start + chunk, width)
            h = self.forward(ids[:, start:end], rows, [start] * len(seqs))  # right padding: no query sees a pad
            for i, s in enumerate(seqs):
                if start <= len(s.prompt) - 1 < end:
                    h_last[i] = h[i, len(s.prompt) - 1 - start].clone()
            if self.speculator:
                self.speculator.prefill(h, ids, rows, start)
        h_last = torch.stack(h_last)
        with self.compute.autocast():
            logits = self.model.lm_head(h_last).float()
        self._keep(rows, logits)
        if self.speculator:
            self.speculator.joined(seqs, h_last)

    def decode(self, seqs):
        """The decode step over each sequence's newest token; sets their next logits."""
        ints = torch.tensor([[s.tokens[-1], s.length, s.slot] for s in seqs], device=self.device)
        self.cache.reserve(max(s.length for s in seqs) + 1)
        if len(seqs) > 1:  # any batch size: one graph for 1 sequence, one for more
            torch._dynamo.maybe_mark_dynamic(ints, 0)
        with self.compute.autocast():
            h, logits = self.decode_step(self.model, ints, self.cache.latent, self.cache.rope)
        self._keep(ints[:, 2], logits)
        if self.speculator:
            self.speculator.took(seqs, h)

    def speculates(self, seqs):
        """Whether the next step of seqs is speculative: with a Speculator, where every one is greedy."""
        return self.speculator is not None and all(s.params.greedy for s in seqs)

    def speculate(self, seqs, rooms):
        """A speculative step of greedy sequences (Speculator.verify); sets their next logits -> the indices of
        those whose draft stands, and those drafts and their log-probabilities."""
        stood, drafts, logits, next_logits = self.speculator.verify(seqs, rooms)
        self._keep(self.rows(seqs), next_logits)
        drafted = logprobs(seqs, drafts, logits[:, 0])  # where a draft stands, it is the greedy token
        return stood, [drafts[i] for i in stood], [drafted[i] for i in stood]

    def prefill_forced(self, seqs):
        """Write each sequence's tokens the cache lacks, its last sampled one and the forced ones after it, as a
        prefill chunk at its position, one forward for the chunks of a length; a sequence's next logits are its
        chunk's last position's."""
        by_length = {}
        for s in seqs:
            n = 1 + next(i for i, forced in enumerate(reversed(s.forced)) if not forced)
            by_length.setdefault(n, []).append(s)
        for n, group in by_length.items():
            rows = self.rows(group)
            ids = torch.tensor([s.tokens[-n:] for s in group], device=self.device)  # (B, n)
            h = self.forward(ids, rows, [s.length - n + 1 for s in group])
            with self.compute.autocast():
                logits = self.model.lm_head(h[:, -1]).float()
            self._keep(rows, logits)
            if self.speculator:  # the MTP module takes these positions at its next speculative step
                self.speculator.took(group, h)

    def forward(self, ids, rows, starts):
        """decode_forward's hidden states over ids (B, T) written at positions starts[b] + t of the rows' slots
        (prefill)."""
        self.cache.reserve(max(starts) + ids.shape[1])
        starts = torch.tensor(starts, device=self.device)
        with self.compute.autocast():
            return decode_forward(self.model, ids, starts, rows, self.cache.latent, self.cache.rope)

    def rows(self, seqs):
        return torch.tensor([s.slot for s in seqs], device=self.device)


def logprobs(seqs, tokens, logits):
    """Each token's log-probability under its row of logits (B, V) where its sequence asks for it, else None."""
    wants = [i for i, s in enumerate(seqs) if s.params.logprobs]
    out = [None] * len(seqs)
    if wants:
        chosen = torch.tensor([[tokens[i]] for i in wants], device=logits.device)
        for i, lp in zip(wants, F.log_softmax(logits[wants], -1).gather(1, chosen).squeeze(1).tolist()):
            out[i] = lp
    return out
