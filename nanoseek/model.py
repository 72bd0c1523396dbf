"""DeepSeek-V3 in one file: MLA, DeepSeekMoE and multi-token prediction.

Module and parameter names follow Hugging Face's DeepseekV3ForCausalLM so a checkpoint maps onto this
model by name; the one exception is the routed experts, which live stacked in two 3-D tensors so that
they run as one grouped matmul (checkpoint.py converts to and from per-expert tensors).
"""

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nanoseek.unlikelihood import unlikelihood_loss

LOGIT_ELEMENTS = 2**27  # at most this many logits (512 MB in fp32) exist at once in a loss: see logit_chunk


@dataclass
class Config:
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 384  # dense SwiGLU layers
    moe_intermediate_size: int = 64  # each routed and shared expert
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    n_shared_experts: int = 1
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    n_group: int = 1  # expert groups for group-limited routing
    topk_group: int = 1  # groups a token may route into
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 1  # the first k layers use a dense MLP
    q_lora_rank: int | None = None  # None: queries use one full projection
    kv_lora_rank: int = 64  # compressed KV latent
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16  # decoupled RoPE key, shared by all heads
    v_head_dim: int = 32
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    num_nextn_predict_layers: int = 0  # multi-token prediction modules
    bos_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: int = 2
    trained_context_length: int | None = None  # nanoseek's own: the sequence length training last ran at
    extra: dict = field(default_factory=dict, repr=False)  # keys from a config.json that we carry but do not use

    @property
    def qk_head_dim(self):
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def to_dict(self):
        d = asdict(self)
        d.pop("extra")
        return d


def trained_context(cfg: Config) -> int:
    """The context length the model was trained at: what a conversation should stay within. A checkpoint that
    does not record it (made before nanoseek did, or elsewhere) gets max_position_embeddings."""
    return min(cfg.trained_context_length or cfg.max_position_embeddings, cfg.max_position_embeddings)


# ----------------------------------------------------------------------------- size dial


def config_for_size(size: int, vocab_size: int | None = None) -> Config:
    """One dial picks every shape: `size` is the depth; width is 64 per layer, heads are 64 wide."""
    if size < 1:
        raise ValueError(f"--size must be >= 1 (got {size}); try 2 for a test model or 6 for the CPU default")
    hidden = 64 * size
    if vocab_size is None:
        vocab_size = 512 if size <= 2 else 4096 if size <= 8 else 32768 if size <= 16 else 65536
    tier = 0 if size < 10 else 1 if size < 16 else 2  # CPU sizes, GPU sizes, ~1B and up
    return Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=round_up(8 * hidden // 3, 64),
        moe_intermediate_size=round_up(hidden // 3, 32),  # fine-grained experts
        num_hidden_layers=size,
        num_attention_heads=size,
        n_shared_experts=1,
        n_routed_experts=(8, 16, 32)[tier],
        num_experts_per_tok=(2, 4, 6)[tier],
        n_group=(1, 4, 8)[tier],
        topk_group=(1, 2, 4)[tier],
        routed_scaling_factor=1.0,
        first_k_dense_replace=1,
        q_lora_rank=3 * hidden // 4 if tier else None,
        kv_lora_rank=min(512, hidden // 2),
        qk_nope_head_dim=64 if size >= 4 else 32,
        qk_rope_head_dim=32 if size >= 4 else 16,
        v_head_dim=64 if size >= 4 else 32,
        max_position_embeddings=4096 if tier else 2048,
        num_nextn_predict_layers=1,
    )


def round_up(x, m):
    return (x + m - 1) // m * m


# ----------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


def yarn_mscale(scale, mscale=1.0):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_tables(cfg: Config):
    """cos and sin per position and frequency pair, (max_position_embeddings, qk_rope_head_dim // 2)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    attention_factor = 1.0
    rs = cfg.rope_scaling
    if rs and rs.get("type", rs.get("rope_type")) == "yarn":
        factor, original = rs["factor"], rs["original_max_position_embeddings"]
        beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
        mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")

        def correction_dim(rotations):
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float) - low) / ((high - low) or 0.001)).clamp(0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    freqs = torch.outer(torch.arange(cfg.max_position_embeddings, dtype=torch.float), inv_freq)
    return freqs.cos() * attention_factor, freqs.sin() * attention_factor


def apply_rope(x, cos, sin):
    """Rotate adjacent pairs (x0, x1), (x2, x3) ... of x (B, T, H, R) by cos/sin (B, T, R/2).

    The output lists the rotated even members, then the odd ones. Queries and keys get the same
    permutation, so their dot products are those of the interleaved layout.
    """
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def softmax_scale(cfg: Config):
    scale = cfg.qk_head_dim**-0.5
    rs = cfg.rope_scaling
    if rs and rs.get("type", rs.get("rope_type")) == "yarn" and rs.get("mscale_all_dim"):
        scale *= yarn_mscale(rs["factor"], rs["mscale_all_dim"]) ** 2
    return scale


# ----------------------------------------------------------------------------- Multi-head Latent Attention


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.scale = softmax_scale(cfg)
        q_out = self.n_heads * cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, cfg.hidden_size, bias=False)

    def queries(self, x):
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x, cos, sin, mask, cache=None):
        if cache is not None:
            return self.forward_absorbed(x, cos, sin, cache)
        B, T, _ = x.shape
        q = self.queries(x).view(B, T, self.n_heads, -1)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin)  # (B, T, 1, R): one rope key for all heads
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(B, T, self.n_heads, -1)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # (B, H, T, nope + rope)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, self.n_heads, -1)], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def forward_absorbed(self, x, cos, sin, cache):
        """Attention over a cache of compressed latents, with kv_b_proj absorbed into the query and output.

        cache.write(latent (B, T, C), k_pe (B, T, R)) stores this chunk and returns every cached latent and
        rope key of these rows, (B, L, C) and (B, L, R), with the mask (B, T, L) of keys each query may see.
        Keys and values are never expanded per head: the cache holds C + R numbers per token and layer.
        """
        B, T, _ = x.shape
        q = self.queries(x).view(B, T, self.n_heads, -1)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)
        latents, rope_keys, mask = cache.write(self.kv_a_layernorm(latent), k_pe)
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]  # (H, nope, C), (H, v, C)
        if T <= 2 and torch.compiler.is_compiling():  # a decode or speculative step
            out = few_query_attention(q_nope, q_pe, w_uk, w_uv, latents, rope_keys, mask, self.scale)
            return self.o_proj(out.reshape(B, T, -1))
        q_latent = torch.einsum("bthd,hdc->bhtc", q_nope, w_uk)
        scores = q_latent @ latents.unsqueeze(1).transpose(-1, -2)  # (B, H, T, L)
        scores = scores + q_pe.transpose(1, 2) @ rope_keys.unsqueeze(1).transpose(-1, -2)
        scores = (scores * self.scale).masked_fill(~mask.unsqueeze(1), float("-inf"))
        out = torch.softmax(scores.float(), dim=-1).to(x.dtype) @ latents.unsqueeze(1)  # (B, H, T, C)
        out = torch.einsum("bhtc,hvc->bthv", out, w_uv)
        return self.o_proj(out.reshape(B, T, -1))


def few_query_attention(q_nope, q_pe, w_uk, w_uv, latents, rope_keys, mask, scale):
    """forward_absorbed's attention for a step's one or two queries per row, written as products summed over
    a dimension: a compiled step fuses each layer's attention into one loop, where the batched matmuls of
    the general form copy the cache once per head. q_nope (B, T, H, nope), q_pe (B, T, H, R), latents
    (B, L, C), rope_keys (B, L, R), mask (B, T, L) -> (B, T, H, v)."""
    q_latent = (q_nope.unsqueeze(-1) * w_uk).sum(-2)  # (B, T, H, C)
    scores = (q_latent.unsqueeze(3) * latents[:, None, None]).sum(-1)  # (B, T, H, L)
    scores = scores + (q_pe.unsqueeze(3) * rope_keys[:, None, None]).sum(-1)
    scores = (scores * scale).masked_fill(~mask.unsqueeze(2), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q_nope.dtype)
    out = (probs.unsqueeze(-1) * latents[:, None, None]).sum(-2)  # (B, T, H, C)
    return (out.unsqueeze(3) * w_uv).sum(-1)


# ----------------------------------------------------------------------------- feed-forward: dense and DeepSeekMoE


class MLP(nn.Module):
    def __init__(self, dim, inter):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Sigmoid router with group-limited top-k; the correction bias steers selection, never the weights."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x):  # x: (N, D) -> weights (N, k), experts (N, k), scores (N, E)
        with torch.autocast(x.device.type, enabled=False):  # float32 routing, in training and inference alike
            scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores.detach() + self.e_score_correction_bias
        if self.n_group > 1:
            grouped = choice.view(x.shape[0], self.n_group, -1)
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # (N, n_group)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1, sorted=False)[1], True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(x.shape[0], -1)
        experts = choice.topk(self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, experts)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, experts, scores

    @torch.no_grad()
    def balance(self, load, speed):
        """Aux-loss-free balancing after a step: the bias of experts given fewer tokens than the mean (load (E,))
        rises by `speed`, of those given more falls; a layer no token reached (load 0) stays as it is."""
        self.e_score_correction_bias += speed * torch.sign(load.mean() - load)


def grouped_mm(x, w, offsets, counts):
    """x (N, in) sorted by group, w (G, in, out), both of one dtype: row block g of x times w[g].

    torch.compile traces F.grouped_mm for bf16 (one graph on a GPU); other dtypes take an eager path."""
    if hasattr(F, "grouped_mm") and x.dtype == torch.bfloat16:
        return F.grouped_mm(x, w, offs=offsets)
    return eager_grouped_mm(x, w, offsets, counts)


@torch.compiler.disable  # the traced kernel accepts bf16 only
def eager_grouped_mm(x, w, offsets, counts):
    if hasattr(F, "grouped_mm") and x.device.type == "cpu":
        return F.grouped_mm(x, w, offs=offsets)
    return torch.cat([xg @ w[g] for g, xg in enumerate(x.split(counts.tolist()))])


def compute_dtype(x):
    """The dtype matmuls on x run in: autocast's when it is on (F.grouped_mm ignores autocast), else x's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class MoE(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        E, D, inter = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.n_experts, self.inter = E, inter
        self.gate = Gate(cfg)
        self.gate_up = nn.Parameter(torch.empty(E, D, 2 * inter))  # per expert: [gate_proj.T | up_proj.T]
        self.down = nn.Parameter(torch.empty(E, inter, D))  # per expert: down_proj.T
        self.shared_experts = MLP(D, inter * cfg.n_shared_experts) if cfg.n_shared_experts else None

    def forward(self, x, routing=None):
        """x (..., D) -> (..., D); with a dict `routing`, routing[self] = Routing of this forward (training's
        load balancing reads it)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        weights, experts, scores = self.gate(x)
        traced = not self.training and torch.compiler.is_compiling()  # a compiled inference step: one graph
        few = isinstance(x.shape[0], int) and x.shape[0] * experts.shape[1] <= self.n_experts
        if traced and few:  # a handful of tokens, known when compiling (one sequence's step): their picks read
            y = self.gathered_experts(x, weights, experts)
        elif traced and compute_dtype(x) != torch.bfloat16 and x.shape[0] * self.n_experts <= self.dense_below:
            # F.grouped_mm is traced for bf16 only; a decode step's few tokens through every expert
            y = self.dense_experts(x, weights, experts)
        else:
            y, load = self.sorted_experts(x, weights, experts)
            if routing is not None:
                routing[self] = Routing(load, scores, experts)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)

    def sorted_experts(self, x, weights, experts):
        """Routed experts over tokens x (N, D) sorted by expert, one grouped matmul for all; -> (output (N, D),
        tokens routed to each expert (E,))."""
        picks = experts.flatten()
        load = torch.zeros(self.n_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, picks, torch.ones_like(picks))  # bincount, with a shape torch.compile knows
        order = picks.argsort(stable=True)  # (N * k): assignments grouped by expert
        token = order // experts.shape[1]
        offsets = load.cumsum(0).to(torch.int32)
        dtype = compute_dtype(x)  # both operands of each grouped matmul in it, as torchtitan does
        h = grouped_mm(x[token].to(dtype), self.gate_up.to(dtype), offsets, load)
        gate, up = h.split(self.inter, dim=-1)
        h = grouped_mm(F.silu(gate) * up, self.down.to(dtype), offsets, load)
        h = h.to(x.dtype) * weights.flatten()[order].unsqueeze(1).to(x.dtype)  # weighted and summed in x's dtype
        return torch.zeros_like(x).index_add_(0, token, h), load

    dense_below = 8192  # (token, expert) pairs up to which a compiled inference step computes every expert

    def gathered_experts(self, x, weights, experts):
        """Each token (N, D) through the weights of its own k experts, gathered: fixed shapes, so a compiled
        decode step stays one graph. It copies N k experts' weights: while N k <= E that reads less than
        dense_experts."""
        picks = experts.flatten()  # (N k)
        dtype = compute_dtype(x)
        x_rows = x.to(dtype).repeat_interleave(experts.shape[1], dim=0)  # (N k, D)
        h = torch.bmm(x_rows[:, None], self.gate_up[picks].to(dtype))[:, 0]  # (N k, 2 inter)
        gate, up = h.split(self.inter, dim=-1)
        h = (F.silu(gate) * up) * weights.flatten()[:, None].to(dtype)
        y = torch.bmm(h[:, None], self.down[picks].to(dtype))[:, 0].to(x.dtype)  # (N k, D)
        return y.view(*experts.shape, -1).sum(1)

    def dense_experts(self, x, weights, experts):
        """Every token (N, D) through every routed expert, weighted by its routing weight (0 where the expert
        was not picked): E / k times the routed arithmetic, but each expert's weights read once and fixed
        shapes, so a compiled decode step over a large batch stays one graph (on a CPU in float32 it is faster
        than gathering from two tokens up, measured in docs/BENCHMARKS.md)."""
        dtype = compute_dtype(x)
        h = torch.matmul(x.to(dtype)[None], self.gate_up.to(dtype))  # (E, N, 2 inter)
        gate, up = h.split(self.inter, dim=-1)
        mix = torch.zeros(x.shape[0], self.n_experts, dtype=dtype, device=x.device).scatter_(
            1, experts, weights.to(dtype))  # (N, E)
        h = F.silu(gate) * up * mix.T[..., None]
        return torch.bmm(h, self.down.to(dtype)).sum(0).to(x.dtype)  # (N, D)


class Routing(NamedTuple):
    """What one MoE layer's router did in a training forward."""

    load: torch.Tensor  # (E,) tokens routed to each expert
    scores: torch.Tensor  # (N, E) sigmoid affinities, float32
    choice: torch.Tensor  # (N, k) the experts each token went to


def sequence_balance_loss(routing: Routing, batch: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss of one MoE layer's routing in a forward.

    Per sequence: sum over experts of f_i * P_i, with f_i = E / (k T) * tokens routed to i and
    P_i = mean over tokens of the normalised affinity s_i / sum_j s_j; averaged over sequences.
    """
    scores, choice = routing.scores, routing.choice  # (B T, E), (B T, k)
    E, k = scores.shape[1], choice.shape[1]
    scores = scores.view(batch, -1, E)
    T = scores.shape[1]
    counts = torch.zeros(batch, E, device=scores.device).scatter_add_(
        1, choice.view(batch, -1), torch.ones(batch, T * k, device=scores.device)
    )
    f = counts * E / (k * T)
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)
    return (f * p).sum(-1).mean()


# ----------------------------------------------------------------------------- transformer


class Block(nn.Module):
    def __init__(self, cfg: Config, layer_id: int):
        super().__init__()
        self.self_attn = Attention(cfg)
        dense = layer_id < cfg.first_k_dense_replace
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size) if dense else MoE(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, routing=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, routing) if isinstance(self.mlp, MoE) else self.mlp(h))


class SharedHead(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(nn.Module):
    """Predicts one token further than the module before it; shares the embedding and output head."""

    def __init__(self, cfg: Config, layer_id: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = Block(cfg, layer_id)
        self.shared_head = SharedHead(cfg)

    def forward(self, h, emb, cos, sin, mask, cache=None, routing=None):
        """h: the previous depth's states, emb: the next tokens' embeddings -> (hidden states for the next
        depth, normed hidden states for the output head)."""
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        h = self.block(h, cos, sin, mask, cache, routing)
        return h, self.shared_head.norm(h)


class Decoder(nn.Module):
    """Embedding, the transformer blocks and the final norm: `model.*` in the official weight names."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepSeekV3(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        n = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(MTPModule(cfg, n + k) for k in range(cfg.num_nextn_predict_layers))
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed=None):
        """Normal(0, initializer_range) weights, output projections scaled down by depth; norms at 1."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * (self.config.num_hidden_layers + len(self.mtp)))
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                s = out_std if name.endswith(("o_proj.weight", "down_proj.weight", ".down")) else std
                p.copy_(torch.randn(p.shape, generator=gen) * s)
        for m in self.modules():
            if isinstance(m, Gate):
                m.e_score_correction_bias.zero_()
        return self

    def moe_layers(self):
        return [m for m in self.modules() if isinstance(m, MoE)]

    def _positions(self, input_ids, attention_mask, position_ids, document_ids=None):
        B, T = input_ids.shape
        limit = self.config.max_position_embeddings
        if document_ids is not None:  # positions within a row of T tokens: below T
            position_ids = positions_in_documents(document_ids)
        given = position_ids is not None and document_ids is None
        if T > limit or (given and T and int(position_ids.max()) >= limit):
            raise ValueError(
                f"sequence of {T} tokens reaches past the model's context of "
                f"{self.config.max_position_embeddings} positions; shorten the input"
            )
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        mask = _mask(attention_mask, T) if document_ids is None else document_mask(document_ids)
        return self.rope_cos[position_ids], self.rope_sin[position_ids], mask

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, document_ids=None, routing=None):
        """Final-norm hidden states (B, T, D) and the rope/mask context the MTP modules reuse."""
        cos, sin, mask = self._positions(input_ids, attention_mask, position_ids, document_ids)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, routing=routing)
        return self.model.norm(x), (cos, sin, mask)

    def forward_cached(self, input_ids, position_ids, caches):
        """Final-norm hidden states (B, T, D) of a chunk of tokens at position_ids (B, T), reading and
        extending the per-layer latent caches (see Attention.forward_absorbed)."""
        cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]
        x = self.model.embed_tokens(input_ids)
        for layer, cache in zip(self.model.layers, caches):
            x = layer(x, cos, sin, None, cache)
        return self.model.norm(x)

    def forward(self, input_ids, attention_mask=None, position_ids=None, targets=None, mtp_weight=0.0,
                document_ids=None, hidden=False, routing=None, negatives=None, unlikelihood=0.0):
        """input_ids (B, T) -> logits (B, T, vocab); attention_mask (B, T) marks real tokens with 1, or
        (B, T, T) says which tokens each token sees (with position_ids, rows that pack sequences sharing a prefix).

        document_ids (B, T) packs several documents in a row: a token attends only to earlier tokens of its
        own document and positions restart at each document (see data.Loader).
        With targets (B, T), where targets[t] is the token after input_ids[t] and -100 is ignored, returns
        (loss, main loss, per-depth MTP losses) instead: loss = main + mtp_weight * mean of the MTP losses.
        With hidden=True, returns the final-norm hidden states (B, T, D) for a caller that applies lm_head
        in chunks (rl.token_logprobs). With negatives (B, T) (-100: none) and unlikelihood > 0, the main loss adds
        unlikelihood times -log(1 - p(negative)) summed and divided by the targets (unlikelihood.py). With a dict
        `routing`, each MoE layer the forward runs puts its Routing there under itself.
        """
        h, ctx = self.hidden_states(input_ids, attention_mask, position_ids, document_ids, routing)
        if hidden:
            return h
        if targets is None:
            return self.lm_head(h)
        main = chunked_cross_entropy(h, self.lm_head.weight, targets)
        if negatives is not None and unlikelihood > 0:
            main = main + unlikelihood * unlikelihood_loss(h, self.lm_head.weight, negatives, targets)
        mtp_losses = []
        if mtp_weight > 0:
            for k, hk in enumerate(self.mtp_hidden_states(h, input_ids, ctx, routing), start=1):
                later = mtp_targets(targets, document_ids, k)  # position t of hk predicts targets[t + k]
                mtp_losses.append(chunked_cross_entropy(hk, self.lm_head.weight, later))
        total = main + mtp_weight * sum(mtp_losses) / len(mtp_losses) if mtp_losses else main
        return total, main, mtp_losses

    def mtp_hidden_states(self, h, input_ids, ctx, routing=None):
        """Yield, per MTP depth k = 1..D, hidden states (B, T - k, D) whose position t predicts token t + k + 1."""
        cos, sin, mask = ctx
        for k, module in enumerate(self.mtp, start=1):
            T = h.shape[1] - 1
            emb = self.model.embed_tokens(input_ids[:, k : k + T])
            m = None if mask is None else mask[..., :T, :T]
            h, normed = module(h[:, :T], emb, cos[:, :T], sin[:, :T], m, routing=routing)
            yield normed


def _mask(attention_mask, T):
    """Boolean (B, 1, T, T) causal mask over real keys, or None for the plain causal case.

    Each position may always see itself, so rows of padding stay finite. A (B, T, T) attention_mask is
    already that: which tokens each token sees (rl.pack's rows of a prompt and its completions).
    """
    if attention_mask is not None and attention_mask.dim() == 3:
        return attention_mask.bool()[:, None]
    if attention_mask is None or bool(attention_mask.all()):
        return None
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    mask = causal & attention_mask.bool()[:, None, None, :]
    return mask | torch.eye(T, dtype=torch.bool, device=attention_mask.device)


def logit_chunk(vocab_size):
    """Tokens whose logits a loss holds at once: LOGIT_ELEMENTS / vocab."""
    return max(1, LOGIT_ELEMENTS // vocab_size)


def chunked_cross_entropy(h, head_weight, targets):
    """Mean cross-entropy of logits h @ head_weight.T (fp32) against targets (-100 ignored), h (B, T, D).

    Past logit_chunk tokens the logits are made chunk by chunk and made again in the backward (activation
    checkpointing), so a large vocabulary never holds (tokens x vocab) in fp32 at once."""
    h, targets = h.flatten(0, 1), targets.flatten()
    chunk = logit_chunk(head_weight.shape[0])
    if h.shape[0] <= chunk:
        return F.cross_entropy(F.linear(h, head_weight).float(), targets, ignore_index=-100)
    total = sum(checkpoint(_summed_cross_entropy, hc, head_weight, tc, use_reentrant=False)
                for hc, tc in zip(h.split(chunk), targets.split(chunk)))
    return total / (targets != -100).sum()


def _summed_cross_entropy(h, head_weight, targets):
    return F.cross_entropy(F.linear(h, head_weight).float(), targets, ignore_index=-100, reduction="sum")


def mtp_targets(targets, document_ids, k):
    """Targets of MTP depth k, (B, T - k): position t predicts targets[t + k], never in another document."""
    later = targets[:, k:]
    if document_ids is not None:
        later = later.masked_fill(document_ids[:, :-k] != document_ids[:, k:], -100)
    return later


def target_counts(targets, document_ids, depths):
    """How many targets each loss averages over: the main loss, then MTP depths 1..depths."""
    counts = [(targets != -100).sum()]
    counts += [(mtp_targets(targets, document_ids, k) != -100).sum() for k in range(1, depths + 1)]
    return torch.stack(counts).float()


def positions_in_documents(document_ids):
    """(B, T) positions counted from the start of each token's document (a change of id starts one)."""
    B, T = document_ids.shape
    index = torch.arange(T, device=document_ids.device).expand(B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def document_mask(document_ids):
    """Boolean (B, 1, T, T) mask: causal, and only within a token's own document."""
    T = document_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    return (causal & (document_ids[:, :, None] == document_ids[:, None, :]))[:, None]


# ----------------------------------------------------------------------------- accounting


def param_counts(model: DeepSeekV3):
    """(total, active per token) parameters; active counts k routed experts per MoE layer, no MTP."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    mtp = sum(p.numel() for p in model.mtp.parameters())
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    n_moe = sum(isinstance(layer.mlp, MoE) for layer in model.model.layers)
    active = total - mtp - n_moe * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    return total, active


def kv_bytes_per_token(cfg: Config, bytes_per_value=2):
    """KV cache per token: the compressed latent and the rope key, per layer."""
    return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * bytes_per_value


def flops_per_token(cfg: Config, active_params, seq_len):
    """Training FLOPs per token: 6 per active matmul weight plus attention scores and values."""
    embed = cfg.vocab_size * cfg.hidden_size
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len
    return 6 * (active_params - embed) + attn
