"""The latent KV cache and the forwards that read and write it.

Per layer the cache holds kv_lora_rank + qk_rope_head_dim numbers a token (MLA's latent), in slots the engine
gives to sequences. A forward over (B, T) tokens writes its positions into the rows' slots and attends over
everything cached. The steps the engine compiles over it are in steps.py and speculation.py.
"""

import torch
import torch.nn.functional as F


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


def forward_logits(model, ids, starts, rows, latent, rope):
    """decode_forward, then the output head: hidden states (B, T, D) and float logits (B, T, V)."""
    h = decode_forward(model, ids, starts, rows, latent, rope)
    return h, model.lm_head(h).float()
