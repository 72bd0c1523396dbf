"""Choosing the next token: sampling settings and one batched draw on the device.

A draw is the exponential race: argmax of p / E with E ~ Exp(1) is a draw from p. A seeded row's E comes
from a counter-based hash of (seed, token index, vocabulary id) computed in 32-bit integer arithmetic, so
its draws are the same alone, in any batch and on any device, and the whole batch is drawn in one call with
no generator per row and no copy from the host.
"""

from dataclasses import dataclass

import torch

MASK32 = 0xFFFFFFFF


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
    # back to back (at least twice) over at least N tokens (text.RepetitionStop); 0: off (eval and GRPO)
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

    @property
    def greedy(self):
        return self.temperature < 1e-4


def sample_tokens(logits, params, counters=None, noise_fn=None):
    """Next tokens (B,) from logits (B, V) on the device: the most likely where temperature < 1e-4, else
    a draw after temperature, top-k and top-p. counters (B,): each row's token index, which with its seed
    picks a seeded row's noise (noise_fn, default seeded_noise: the engine passes it compiled); unseeded rows
    draw from torch's generator."""
    if all(sp.greedy for sp in params):
        return logits.argmax(-1)
    device = logits.device
    greedy = torch.tensor([sp.greedy for sp in params], device=device)
    temperature = torch.tensor([max(sp.temperature, 1e-4) for sp in params], device=device)
    scaled = logits / temperature[:, None]
    if any(sp.top_k or sp.top_p < 1.0 for sp in params):
        scaled = top_k_top_p(scaled, params)
    seeded = [sp.seed is not None for sp in params]
    if any(seeded):
        seeds = [sp.seed or 0 for sp in params]
        counters = counters if counters is not None else [0] * len(params)
        keys = torch.tensor([[s & MASK32, s >> 32, c & MASK32] for s, c in zip(seeds, counters)], device=device)
        noise = (noise_fn or seeded_noise)(keys, logits.shape[1]).to(scaled.dtype)
        if not all(seeded):
            noise = torch.where(torch.tensor(seeded, device=device)[:, None], noise,
                                torch.empty_like(scaled).exponential_())
    else:
        noise = torch.empty_like(scaled).exponential_()
    drawn = (scaled.softmax(-1) / noise).argmax(-1)
    return torch.where(greedy, logits.argmax(-1), drawn)


def seeded_noise(keys, vocab):
    """Exp(1) noise (B, V) from keys (B, 3) = (seed low 32 bits, seed high 32 bits, token index): each value a
    hash of its row's key and its vocabulary id, exact integer arithmetic on any device."""
    key = hash32(hash32(hash32(keys[:, 0] ^ 0x6A09E667) ^ keys[:, 1]) ^ keys[:, 2])  # (B,); no input maps to 0
    ids = torch.arange(1, vocab + 1, device=keys.device, dtype=torch.int64)
    bits = hash32(hash32(key[:, None] ^ ((ids * 0x9E3779B9) & MASK32)))  # (B, V), uniform on 0 .. 2^32 - 1
    uniform = ((bits >> 8).double() + 0.5) / 2**24  # 24 bits, never 0 or 1
    return -torch.log(uniform)


def hash32(x):
    """A 32-bit integer hash (xorshift-multiply, as in murmur3's finalizer) of int64 tensors holding values in
    0 .. 2^32 - 1; products are split in 16-bit halves so nothing overflows int64."""
    x = x ^ (x >> 16)
    x = mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def mul32(x, c):
    """(x * c) mod 2^32 for x in 0 .. 2^32 - 1 without leaving int64's range."""
    low, high = c & 0xFFFF, c >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & MASK32


def top_k_top_p(scaled, params):
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
