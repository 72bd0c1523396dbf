"""`nanoseek plan`: what each stage of a recipe needs per rank (memory, tokens, FLOPs, time) before any work
starts, and a refusal, with the fix, when a stage cannot fit.

Memory is counted from the shapes: fp32 weights, gradients and optimizer state (sharded under FSDP), the
activations autograd keeps for one micro-batch (counted op by op from the model's forward, see
block_activations), the logits of the loss (made in chunks past model.LOGIT_ELEMENTS) and, for GRPO, the
rollouts' latent cache. tests/test_plan.py checks the activation count against what autograd really saves.
"""

import os
from dataclasses import dataclass

import torch

from nanoseek.hardware import GPUS, gpu_named, peak_flops
from nanoseek.model import (
    DeepSeekV3,
    config_for_size,
    flops_per_token,
    kv_bytes_per_token,
    logit_chunk,
    param_counts,
    round_up,
)
from nanoseek.optim import build_optimizer
from nanoseek.train import micro_steps

MFU = 0.4  # the share of the peak a step is assumed to reach when the plan times it
# Bytes per activation element counted below, by compute dtype: under bf16 autocast the residual stream and the
# norms stay fp32 and each matmul keeps a bf16 copy of its input, 3.0-3.3 bytes an element as measured
# (tests/test_plan.py measures both against what autograd saves).
ACTIVATION_BYTES = {4: 4.0, 2: 3.2}
PROMPT_TOKENS = 128  # GRPO prompts are assumed this long (the built-in tasks' are shorter)


class PlanError(ValueError):
    pass


@dataclass
class Device:
    name: str  # "H100", or "cpu"
    peak: float  # FLOP/s
    memory: float  # bytes per rank
    gpus: int
    dtype_bytes: int  # the compute dtype: 2 for bf16 autocast on a GPU, 4 for fp32
    attention_matrix: bool  # attention probabilities kept per head (the CPU's math path); a GPU's kernels do not


def device_for(gpu=None, gpus=1, dtype="auto", device=""):
    """The device a plan is for: a named GPU from hardware.GPUS, this machine's GPU (unless device is "cpu"),
    or this machine's CPU."""
    if gpus < 1:
        raise PlanError(f"--gpus {gpus}: a plan is for 1 or more GPUs (ranks)")
    if gpu:
        name = gpu_named(gpu)
        if name is None:
            raise PlanError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
        peak, memory = GPUS[name]
        return Device(name, peak, memory, gpus, 4 if dtype == "float32" else 2, False)
    if torch.cuda.is_available() and device != "cpu":
        name = gpu_named(torch.cuda.get_device_name()) or torch.cuda.get_device_name()
        memory = torch.cuda.get_device_properties(0).total_memory
        return Device(name, peak_flops("cuda", torch.bfloat16)[0], memory, gpus, 4 if dtype == "float32" else 2, False)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / gpus
    return Device("cpu", peak_flops("cpu", torch.float32)[0], memory, gpus, 4, True)


# ----------------------------------------------------------------------------- activations


def attention_activations(cfg, seq, attention_matrix):
    """Elements per token autograd keeps for one MLA layer: the norm, the projections' inputs, the latent and
    its norm, the queries and keys fed to attention, its output and that output reshaped for o_proj; with
    attention_matrix, the probabilities of every head over the row (the math path of scaled_dot_product_attention)."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    qk, C = cfg.qk_head_dim, cfg.kv_lora_rank
    queries = H * qk + (3 * cfg.q_lora_rank if cfg.q_lora_rank else 0)
    latent = C + cfg.qk_rope_head_dim + 2 * C
    keys_values = H * (cfg.qk_nope_head_dim + cfg.v_head_dim) + 2 * H * qk
    return 3 * D + queries + latent + keys_values + 2 * H * cfg.v_head_dim + (H * seq if attention_matrix else 0)


def ffn_activations(cfg, moe):
    """Elements per token autograd keeps for a feed-forward layer: the norm, and for each expert a token
    reaches its input and output, gate and up projections and their product; the router's fp32 scores."""
    D = cfg.hidden_size
    if not moe:
        return 3 * D + 4 * cfg.intermediate_size
    routed = cfg.num_experts_per_tok * (2 * D + 4 * cfg.moe_intermediate_size)
    return 3 * D + 2 * cfg.n_routed_experts + routed + 4 * cfg.moe_intermediate_size * cfg.n_shared_experts


def block_activations(cfg, seq, attention_matrix, layer):
    return attention_activations(cfg, seq, attention_matrix) + ffn_activations(cfg, layer >= cfg.first_k_dense_replace)


def activation_bytes(cfg, rows, seq, dtype_bytes, attention_matrix, mtp=True, logits=True):
    """Bytes autograd keeps for a forward of rows x seq tokens: every layer, the final norm, the MTP modules
    when trained, and the log-softmax of the loss when it is not made in chunks (logits=False: none)."""
    tokens = rows * seq
    layers = sum(block_activations(cfg, seq, attention_matrix, i) for i in range(cfg.num_hidden_layers))
    depths = cfg.num_nextn_predict_layers if mtp else 0
    mtp_module = 11 * cfg.hidden_size + block_activations(cfg, seq, attention_matrix, cfg.num_hidden_layers)
    elements = tokens * (layers + 3 * cfg.hidden_size + depths * mtp_module)
    kept_logits = 0
    if logits and tokens <= logit_chunk(cfg.vocab_size):  # in chunks, only the chunks' inputs are kept
        kept_logits = tokens * cfg.vocab_size * 4 * (1 + depths)
    return elements * ACTIVATION_BYTES[dtype_bytes] + kept_logits


def logits_bytes(cfg, tokens, dtype_bytes):
    """The logits alive at once in a loss and its backward: one chunk in the compute dtype, in fp32, its
    log-softmax and their gradient."""
    return min(tokens, logit_chunk(cfg.vocab_size)) * cfg.vocab_size * (dtype_bytes + 12)


# ----------------------------------------------------------------------------- stages


def model_for(recipe):
    """The recipe's model on the meta device: shapes, no memory."""
    o = recipe["pretrain"]
    cfg = config_for_size(o["size"], vocab_size=round_up(recipe["data"]["vocab_size"], 64))
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, recipe["pretrain"]["seq"], recipe["sft"]["seq"])
    with torch.device("meta"):
        return DeepSeekV3(cfg)


def parameter_split(model):
    """(total, MTP, what Muon trains: the hidden matrices, as optim.build_optimizer groups them) parameters."""
    muon = build_optimizer(model, "muon", 1.0, 0.0, (0.9, 0.95)).param_groups
    matrices = sum(p.numel() for group in muon if group.get("muon") for p in group["params"])
    return param_counts(model)[0], sum(p.numel() for p in model.mtp.parameters()), matrices


def state_bytes(params, trained, muon_params, optimizer):
    """fp32 weights, the gradients of the trained ones and the optimizer's state: Muon keeps one momentum per
    hidden-matrix weight, AdamW two moments per weight."""
    muon = min(muon_params, trained) if optimizer == "muon" else 0
    return 4 * params + 4 * trained + 4 * muon + 8 * (trained - muon)


def training_stage(stage, o, model, dev):
    """One pretrain or SFT stage's row of the plan."""
    cfg = model.config
    params, mtp, matrices = parameter_split(model)
    trained = params - (mtp if o["mtp_weight"] == 0 else 0)
    shards = dev.gpus if o["fsdp"] else 1
    rows = o["batch"] // dev.gpus // micro_steps(o["batch"], o["device_batch"], dev.gpus)  # what a forward holds
    seq = o["seq"]
    block = block_activations(cfg, seq, dev.attention_matrix, cfg.num_hidden_layers) * rows * seq * dev.dtype_bytes
    casts = 2 * params if dev.dtype_bytes == 2 else 0  # autocast's bf16 copies of the weights, kept for the step
    memory = {
        "state": state_bytes(params, trained, matrices, o["optimizer"]) / shards + casts / shards,
        "activations": activation_bytes(cfg, rows, seq, dev.dtype_bytes, dev.attention_matrix, o["mtp_weight"] > 0)
        + block,  # + one block's gradients in flight in the backward
        "logits": logits_bytes(cfg, rows * seq, dev.dtype_bytes),
        "cache": 0,
    }
    flops = flops_per_token(cfg, param_counts(model)[1], seq) * o["batch"] * seq
    return stage_row(stage, "device_batch", rows, memory, o["batch"] * seq, flops, o["steps"], dev)


def grpo_stage(o, model, dev, stage="rl"):
    """The GRPO stage's row: the policy (and reference), the rollouts' latent cache and the update's
    micro-batch."""
    cfg = model.config
    params, mtp, matrices = parameter_split(model)
    trained = params - mtp  # GRPO freezes the MTP modules
    per_rank = max(1, o["prompts"] // dev.gpus) * o["group"]
    length = PROMPT_TOKENS + o["max_new_tokens"]
    rows = min(o["micro_batch"] or per_rank, per_rank)
    reference = 4 * params if o["beta"] > 0 else 0
    block = block_activations(cfg, length, dev.attention_matrix, cfg.num_hidden_layers) * rows * length
    memory = {
        "state": state_bytes(params, trained, matrices, o["optimizer"]) + reference,
        "activations": activation_bytes(cfg, rows, length, dev.dtype_bytes, dev.attention_matrix, mtp=False,
                                        logits=False) + block * dev.dtype_bytes,  # + one block in the backward
        "logits": logits_bytes(cfg, rows * length, dev.dtype_bytes),
        "cache": per_rank * length * kv_bytes_per_token(cfg, 4),  # the engine's cache is fp32
    }
    tokens = o["prompts"] * o["group"] * length
    passes = 2 + 6 * o["mu"] + (2 if o["mu"] > 1 else 0) + (2 if o["beta"] > 0 else 0)  # rollout, update, old, ref
    flops = passes * param_counts(model)[1] * tokens
    return stage_row(stage, "micro_batch", rows, memory, tokens, flops, o["steps"], dev)


def stage_row(stage, key, rows, memory, tokens, flops, steps, dev):
    """A row of the plan; key and rows: the option that sets a forward's rows per rank, and their number."""
    seconds = flops / (MFU * dev.peak * dev.gpus)
    return {"stage": stage, "key": key, "rows": rows, **memory, "peak": sum(memory.values()), "tokens": tokens,
            "flops": flops, "step_seconds": seconds, "stage_seconds": seconds * steps}


def plan(recipe, dev, model=None):
    """Rows of the plan, one per training stage of the recipe; model: model_for(recipe), made once."""
    model = model or model_for(recipe)
    rows = []
    for stage in recipe["run"]["stages"]:
        o = recipe[stage]
        if stage in ("pretrain", "sft"):
            rows.append(training_stage(stage, o, model, dev))
        elif stage == "rl":
            rows.append(grpo_stage(o, model, dev))
    return rows


def misfit(recipe, rows, dev, model):
    """None when every stage fits in 95% of a rank's memory, else what does not and the fix."""
    limit = 0.95 * dev.memory
    for row in rows:
        if row["peak"] <= limit:
            continue
        stage = row["stage"]
        o = recipe[stage]
        fix = "a smaller model ([pretrain] size) or more GPUs"
        if row["state"] > limit and stage in ("pretrain", "sft") and not o["fsdp"] and dev.gpus > 1:
            fix = f"[{stage}] fsdp = true (weights, gradients and optimizer state sharded over {dev.gpus} ranks)"
        elif row["state"] < limit:
            key, current = row["key"], row["rows"]
            smaller = [current >> i for i in range(1, current.bit_length())]  # halvings; a rank's rows must divide
            if key == "device_batch":
                smaller = [n for n in range(current - 1, 0, -1) if current % n == 0]
            fitting = next((n for n in smaller if fits_with(recipe, stage, key, n, dev, limit, model)), None)
            if fitting:
                fix = f"[{stage}] {key} = {fitting}"
        return (f"{stage} needs {gib(row['peak'])} per rank, more than the {gib(dev.memory)} of {dev.name}: "
                f"set {fix} (`nanoseek plan --set {stage}.KEY=VALUE` shows the effect)")
    return None


def fits_with(recipe, stage, key, value, dev, limit, model):
    changed = {**recipe, stage: {**recipe[stage], key: value}}
    return all(r["peak"] <= limit for r in plan(changed, dev, model) if r["stage"] == stage)


# ----------------------------------------------------------------------------- the table


def gib(n):
    return f"{n / 2**30:.2f} GiB" if n < 2**40 else f"{n / 2**40:.2f} TiB"


def duration(seconds):
    if seconds < 1:
        return f"{seconds * 1000:.3g} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def table(recipe, rows, dev, model):
    cfg = model.config
    (params, active), mtp = param_counts(model), sum(p.numel() for p in model.mtp.parameters())
    lines = [f"plan for {recipe['path']} on {dev.gpus} x {dev.name} ({gib(dev.memory)} and "
             f"{dev.peak / 1e12:.3g} TFLOP/s each; times at {MFU:.0%} of that)",
             f"model: {params:,} parameters ({mtp:,} in MTP), {active:,} active per token, "
             f"vocab {cfg.vocab_size:,}",
             "",
             "| stage | micro-batch per rank | weights, grads, optimizer | activations | logits | KV cache "
             "| peak per rank | tokens per step | FLOPs per step | time per step | stage time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['key']} {r['rows']} | {gib(r['state'])} | {gib(r['activations'])} | "
                     f"{gib(r['logits'])} | {gib(r['cache'])} | {gib(r['peak'])} | {r['tokens']:,} | "
                     f"{r['flops']:.2e} | {duration(r['step_seconds'])} | {duration(r['stage_seconds'])} |")
    total = sum(r["stage_seconds"] for r in rows)
    if "rs" in recipe["run"]["stages"]:
        lines.append("| rs | (rejection sampling: sampled like GRPO's rollouts, trained like SFT; not planned) |")
    if "mtp" in recipe["run"]["stages"]:
        lines.append("| mtp | (the MTP module alone on the model's greedy answers: under SFT's step; not planned) |")
    lines.append(f"\ntraining time at {MFU:.0%} MFU: {duration(total)} (GRPO's rollouts decode, which runs "
                 f"well below {MFU:.0%}: its time is a floor; GRPO prompts taken as {PROMPT_TOKENS} tokens)")
    return "\n".join(lines)


def plan_recipe(recipe, gpu=None, gpus=1):
    """(the plan's table, None or why it cannot fit and the fix) for a loaded recipe (pipeline.load_recipe) on
    `gpus` x `gpu` (None: this machine's GPU, or its CPU)."""
    dev = device_for(gpu, gpus, recipe["run"]["dtype"], recipe["run"]["device"])
    model = model_for(recipe)
    rows = plan(recipe, dev, model)
    return table(recipe, rows, dev, model), misfit(recipe, rows, dev, model)
