"""Side-by-side benchmarks against the projects people use today; each prints a ratio last."""

import tempfile
import time

import torch

from nanoseek import checkpoint
from nanoseek.model import DeepSeekV3, config_for_size, flops_per_token, param_counts


def matmul_peak_flops(device="cpu", dtype=torch.float32, n=1024, reps=10):
    """Measured peak of this machine: best FLOP/s of an n x n matmul."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 2):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _time_steps(step, steps, warmup, device):
    for _ in range(warmup):
        step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    return (time.perf_counter() - t) / steps, float(loss)


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)


def bench_train(size=6, batch=8, seq=256, steps=10, warmup=3, seed=0, device=None, peer="transformers"):
    """Forward + backward + AdamW step on the same config, weights and batch; returns a dict of figures."""
    if peer != "transformers":
        raise ValueError(f"unknown peer {peer!r}: the train benchmark compares with 'transformers'")
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    cfg = config_for_size(size)
    cfg.num_nextn_predict_layers = 0  # transformers has no MTP training path: compare the same work
    torch.manual_seed(seed)
    ours = DeepSeekV3(cfg).init_weights(seed)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.save(tmp, ours, None)
        theirs = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    ours.to(device).train()
    theirs.to(device).train()
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    autocast = torch.autocast(device_type="cuda", dtype=dtype, enabled=dtype != torch.float32)

    opt_ours, opt_theirs = _adamw(ours.parameters()), _adamw(theirs.parameters())

    def step_ours():
        with autocast:
            loss = ours(x, targets=y)[0]
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss.detach()

    def step_theirs():
        with autocast:
            loss = theirs(input_ids=x, labels=x).loss  # it shifts labels itself: position t learns x[t + 1]
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)
        return loss.detach()

    total, active = param_counts(ours)
    peak = matmul_peak_flops(device, dtype)
    flops = flops_per_token(cfg, active, seq)
    out = {"size": size, "batch": batch, "seq": seq, "device": device, "dtype": str(dtype).replace("torch.", ""),
           "threads": torch.get_num_threads(), "params_total": total, "params_active": active, "peak_flops": peak}
    for name, step in (("nanoseek", step_ours), ("transformers", step_theirs)):
        sec, loss = _time_steps(step, steps, warmup, device)
        tps = batch * seq / sec
        out[name] = {"sec_per_step": sec, "tokens_per_s": tps, "mfu": tps * flops / peak, "loss": loss}
    out["speedup"] = out["nanoseek"]["tokens_per_s"] / out["transformers"]["tokens_per_s"]
    return out


def print_train(r):
    params = f"{r['params_total'] / 1e6:.1f}M total, {r['params_active'] / 1e6:.1f}M active"
    print(f"bench train: size {r['size']} ({params}), "
          f"batch {r['batch']} x {r['seq']} tokens, {r['device']} {r['dtype']}, {r['threads']} threads")
    print(f"matmul peak (measured): {r['peak_flops'] / 1e9:.1f} GFLOP/s")
    for name in ("nanoseek", "transformers"):
        s = r[name]
        print(f"{name:>13}: {s['tokens_per_s']:9.0f} tokens/s  {s['sec_per_step'] * 1000:8.1f} ms/step  "
              f"MFU {100 * s['mfu']:5.1f}%  loss {s['loss']:.4f}")
    print(f"speedup vs transformers: {r['speedup']:.2f}")

