"""The optimizer: Muon for the matrices inside the network, AdamW for everything else, as one torch optimizer.

Muon (Keller Jordan, 2024) turns each matrix's momentum into the nearest (semi-)orthogonal matrix with a
few Newton-Schulz iterations, so every direction of the update moves at the same rate. It takes the hidden
matrices: attention and MLP projections, and the routed experts, stacked as (experts, in, out) and
orthogonalised matrix by matrix in one batched iteration (each expert's gate and up projections apart, as
the dense MLP's are). The embeddings, the output head, the router,
the norms and the biases keep AdamW. Each Muon update is scaled to the RMS of an AdamW update,
0.2 * sqrt(max(rows, cols)) (Liu et al. 2025, "Muon is Scalable for LLM Training", the recipe Moonlight
trains a DeepSeek-V3 MoE with), so one learning rate, one weight decay and one schedule drive both.

The state is plain tensors per parameter (Muon: momentum_buffer; AdamW: step, exp_avg, exp_avg_sq), which
train.py saves by name in safetensors.
"""

import torch
from torch.optim.adamw import adamw

from nanoseek.checkpoint import CheckpointError
from nanoseek.hardware import fast_bfloat16
from nanoseek.model import DeepSeekV3, Gate

OPTIMIZERS = ("muon", "adamw")
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: the steepest slope at zero that converges
NS_STEPS = 5


def newton_schulz(g, steps=NS_STEPS, eps=1e-7):
    """(..., m, n) -> the same shape, each m x n matrix orthogonalised: U S' V^T for g = U S V^T, with S' near 1.

    Runs in bfloat16 like the reference Muon where bfloat16 is fast (the iteration tolerates it: a GPU, a CPU
    with bf16 units), in float32 elsewhere; leading dimensions are a batch of independent matrices."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.bfloat16 if fast_bfloat16(g.device.type) else torch.float32)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide side: the Gram matrix x x^T is the smaller one
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm = 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


def muon_scale(shape):
    """Scale that gives an orthogonalised (rows x cols) update the RMS of an AdamW update: 0.2 * sqrt(max)."""
    return 0.2 * max(shape[-2], shape[-1]) ** 0.5


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the groups marked {"muon": True}, fused AdamW on the others; lr and weight decay are per group."""

    def __init__(self, groups, lr, betas=(0.9, 0.95), momentum=0.95, eps=1e-8):
        defaults = {"lr": lr, "betas": betas, "momentum": momentum, "eps": eps, "weight_decay": 0.0, "muon": False,
                    "parts": 1}
        super().__init__(groups, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.dim() < 2 for p in group["params"]):
                raise ValueError("Muon takes matrices (or stacks of them) only")

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon if group["muon"] else self._adamw)(group, params)

    def _state(self, p, key):
        state = self.state[p]
        if state and key not in state:
            raise ValueError(f"the optimizer state of a {tuple(p.shape)} parameter was not written by "
                             f"{'Muon' if key == 'momentum_buffer' else 'AdamW'}: resume with the --optimizer "
                             "the run started with")
        return state

    def _muon(self, group, params):
        lr, momentum = group["lr"], group["momentum"]
        for p in params:
            state = self._state(p, "momentum_buffer")
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)
            update = orthogonalise(p.grad.lerp(buf, momentum), group["parts"])  # Nesterov: through momentum
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(update, alpha=-lr * muon_scale((*p.shape[:-1], p.shape[-1] // group["parts"])))

    def _adamw(self, group, params):
        for p in params:
            state = self._state(p, "exp_avg")
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
              [], [s["step"] for s in states], fused=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def orthogonalise(update, parts=1):
    """newton_schulz of (..., rows, parts * cols) as `parts` matrices side by side (the experts' [gate | up]),
    on whole matrices: an FSDP-sharded update is gathered, orthogonalised, and sharded again."""
    full = update.full_tensor() if hasattr(update, "device_mesh") else update
    split = full.unflatten(-1, (parts, -1)).movedim(-2, 0).contiguous()  # (parts, ..., rows, cols)
    out = newton_schulz(split).movedim(0, -2).flatten(-2)
    if full is update:
        return out
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(out, update.device_mesh, update.placements)


def build_optimizer(model: DeepSeekV3, name, lr, weight_decay, betas):
    """MuonAdamW over model: Muon on the hidden matrices when name is "muon", AdamW on every weight for "adamw".

    Matrices decay by weight_decay, vectors (norms) do not."""
    if name not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, not {name!r}")
    adamw_only = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding | Gate) for p in m.parameters()}
    adamw_only.add(id(model.lm_head.weight))
    gate_up = {id(m.gate_up) for m in model.moe_layers()}  # per expert [gate_proj.T | up_proj.T]: two matrices
    hidden, paired, other, vectors = [], [], [], []
    for p in model.parameters():
        if p.dim() < 2:
            vectors.append(p)
        elif name == "muon" and id(p) not in adamw_only:
            (paired if id(p) in gate_up else hidden).append(p)
        else:
            other.append(p)
    groups = [{"params": hidden, "weight_decay": weight_decay, "muon": True},
              {"params": paired, "weight_decay": weight_decay, "muon": True, "parts": 2},
              {"params": other, "weight_decay": weight_decay},
              {"params": vectors, "weight_decay": 0.0}]
    return MuonAdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def optimizer_tensors(opt, model):
    """Optimizer state as named tensors, "{parameter}.{state key}" (safetensors, never pickle)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                out[f"{names[id(p)]}.{key}"] = value.detach()
    return out


def restore_optimizer(opt, model, tensors):
    params = dict(model.named_parameters())
    for name, t in tensors.items():
        pname, key = name.rsplit(".", 1)
        if pname not in params:
            raise CheckpointError(f"optimizer state names unknown parameter {pname}")
        p = params[pname]
        if key != "step" and hasattr(p, "device_mesh"):  # an FSDP-sharded parameter: keep this rank's shard
            from torch.distributed.tensor import distribute_tensor

            t = distribute_tensor(t.to(p.device), p.device_mesh, p.placements)
        opt.state[p][key] = t.to(p.device)  # fused AdamW keeps its step count on the parameter's device
