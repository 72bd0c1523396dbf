"""`nanoseek bench train`: time to the same held-out loss, nanoseek's pretraining against the transformers way
of training the same DeepSeek-V3 config."""

import math
import os
import statistics
import tempfile
import time

import torch

from nanoseek import checkpoint
from nanoseek.bench.common import quiet_transformers, sync
from nanoseek.data import Loader, build, sequential_batches
from nanoseek.device import choose_compute
from nanoseek.hardware import matmul_peak_flops
from nanoseek.model import (
    DeepSeekV3,
    config_for_size,
    document_mask,
    flops_per_token,
    param_counts,
    positions_in_documents,
    round_up,
)


def task_texts(problems, seed=0):
    """Worked additions and Countdown solutions as plain text, as the cpu recipe pretrains on: data a model of
    the CPU size learns within a few hundred steps, so loss curves mean something."""
    import random

    from nanoseek.tasks import get_task

    rng = random.Random(seed)
    for name, difficulty in (("addition", [2, 3, 3]), ("countdown", 3)):
        task = get_task(name)
        for _ in range(problems):
            problem = task.sample(rng, "train", difficulty)
            reasoning, answer = task.solve(problem)
            yield "text", f"{problem.question}\n{reasoning}\nAnswer: {answer}"


def held_out_loss(loss_of, data, seq, rows):
    """Mean loss per target token over the first `rows` held-out rows; loss_of(x, y, docs) -> mean loss."""
    nats, tokens = 0.0, 0
    with torch.no_grad():
        for x, y, docs in sequential_batches(data, "val", seq, 8, rows):
            n = int((y != -100).sum())
            nats += float(loss_of(x, y, docs)) * n
            tokens += n
    return nats / tokens


def train_transformers_way(init, data, lr, steps, batch, seq, warmup, eval_every, eval_rows, seed, compute):
    """DeepseekV3ForCausalLM trained as a transformers user does: torch AdamW (fused), warmup + cosine from
    transformers, gradient clipping at 1.0; the same rows in the same order as nanoseek's loader gives.
    Returns (seconds per step, [(step, held-out loss)])."""
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    device = compute.device
    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32).to(device).train()
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), fused=True)
    schedule = get_cosine_schedule_with_warmup(opt, warmup, steps)
    loader = Loader(data, "train", seq, batch, seed=seed)

    def loss_of(x, y, docs):  # documents packed in a row attend only to themselves, as in nanoseek
        x, y, docs = x.to(device), y.to(device), docs.to(device)
        mask, positions = document_mask(docs), positions_in_documents(docs)
        with compute.autocast():
            return model(input_ids=x, attention_mask=mask, position_ids=positions, labels=y, shift_labels=y).loss

    times, curve = [], []
    for step in range(steps):
        t = time.perf_counter()
        loss_of(*loader.next_batch()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            model.eval()
            curve.append((step + 1, held_out_loss(loss_of, data, seq, eval_rows)))
            model.train()
    return statistics.median(times[3:] or times), curve


def train_nanoseek_way(init, data, lr, steps, batch, seq, warmup, eval_every, eval_rows, seed, compute, out):
    """`nanoseek pretrain` from init with its defaults (optimizer, schedule, compile setting) but the given
    lr, steps, batch and warmup. Returns (seconds per step, [(step, held-out loss)])."""
    from nanoseek.rundir import read_metrics
    from nanoseek.train import train

    train({"init": init, "data": data, "out": out, "lr": lr, "steps": steps, "batch": batch, "seq": seq,
           "warmup": warmup, "eval_every": eval_every, "eval_windows": eval_rows, "ckpt_every": 0, "seed": seed,
           "device": compute.device, "dtype": str(compute.dtype).replace("torch.", ""), "progress": False}, "pretrain")
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    times = [batch * seq / r["tokens_per_s"] for r in rows]
    return statistics.median(times[3:] or times), [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def steps_to(curve, target):
    """The first evaluated step whose held-out loss is at or below target (None: never)."""
    return next((step for step, loss in curve if loss <= target), None)


def bench_train(size=4, batch=8, seq=256, steps=100, sweep=False, lrs=None, peer_lrs=None, eval_every=5,
                eval_rows=32, problems=3000, seed=0, device=None, peer="transformers", say=print):
    """Time to the same held-out loss, nanoseek's way against the transformers way, on task text.

    Same config, initial weights, data order and batch on both sides; each side trains `steps` steps at each
    of its peak learning rates: lrs / peer_lrs, else the three of TRAIN_LRS with sweep, else the best of
    those three in the recorded sweep (BEST_LRS, docs/BENCHMARKS.md). The target is the held-out loss the
    transformers way reaches with its best rate at the end of its run; each side's time to target is its steps
    to target (at its best rate) times its median seconds per step, both measured in this run."""
    if peer != "transformers":
        raise ValueError(f"unknown peer {peer!r}: the train benchmark compares with 'transformers'")
    from nanoseek.tokenizer import train_tokenizer

    quiet_transformers()
    rates = TRAIN_LRS if sweep else {side: (lr,) for side, lr in BEST_LRS.items()}
    lrs, peer_lrs = lrs or rates["nanoseek"], peer_lrs or rates["transformers"]
    compute = choose_compute(device)
    device, dtype = compute.device, compute.dtype
    warmup = max(1, steps // 10)
    with tempfile.TemporaryDirectory() as tmp:
        texts = list(task_texts(problems, seed))
        tok = train_tokenizer([t for _, t in texts], vocab_size=1024)
        data = os.path.join(tmp, "data")
        build(None, tok, data, val_fraction=0.02, documents=texts)
        cfg = config_for_size(size, vocab_size=round_up(len(tok), 64))
        cfg.num_nextn_predict_layers = 0  # transformers has no MTP training path: compare the same work
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_id, tok.eos_id, tok.pad_id
        model = DeepSeekV3(cfg).init_weights(seed)
        init = os.path.join(tmp, "init")
        checkpoint.save(init, model, tok)
        total, active = param_counts(model)
        args = (init, data)
        kw = {"steps": steps, "batch": batch, "seq": seq, "warmup": warmup, "eval_every": eval_every,
              "eval_rows": eval_rows, "seed": seed, "compute": compute}
        runs = {"transformers": {}, "nanoseek": {}}
        for i in range(max(len(lrs), len(peer_lrs))):  # the sides take turns, so a change in load hits both
            for side, rates in (("transformers", peer_lrs), ("nanoseek", lrs)):
                if i < len(rates):
                    lr = rates[i]
                    runs[side][lr] = (train_transformers_way(*args, lr, **kw) if side == "transformers" else
                                      train_nanoseek_way(*args, lr, **kw, out=os.path.join(tmp, f"ours_{lr}")))
                    sec, curve = runs[side][lr]
                    say(f"{side} at peak lr {lr:g}: held-out loss {curve[-1][1]:.4f} after {steps} steps, "
                        f"{sec * 1000:.0f} ms/step")
    peak = matmul_peak_flops(device, dtype)  # the same peak on both sides: only the ratio matters
    flops = flops_per_token(cfg, active, seq)
    target = min(curve[-1][1] for _, curve in runs["transformers"].values())
    out = {"size": size, "batch": batch, "seq": seq, "steps": steps, "warmup": warmup, "eval_every": eval_every,
           "eval_rows": eval_rows, "device": device, "dtype": str(dtype).replace("torch.", ""),
           "threads": torch.get_num_threads(), "params_total": total, "params_active": active, "peak_flops": peak,
           "train_documents": len(texts), "vocab_size": len(tok), "target_loss": target}
    for side, by_lr in runs.items():
        reached = {lr: steps_to(curve, target) for lr, (_, curve) in by_lr.items()}
        best = min(by_lr, key=lambda lr: (reached[lr] or math.inf, by_lr[lr][1][-1][1]))
        sec = statistics.median(sec for sec, _ in by_lr.values())  # s/step does not depend on the rate
        tps = batch * seq / sec
        out[side] = {"best_lr": best, "steps_to_target": reached[best], "sec_per_step": sec, "tokens_per_s": tps,
                     "mfu": tps * flops / peak, "optimizer": TRAIN_WAYS[side],
                     "sweep": {lr: {"final_loss": curve[-1][1], "steps_to_target": reached[lr], "curve": curve}
                               for lr, (_, curve) in by_lr.items()}}
        out[side]["time_to_target"] = reached[best] * sec if reached[best] else None
    ours, theirs = out["nanoseek"], out["transformers"]
    out["throughput_ratio"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
    out["speedup"] = theirs["time_to_target"] / ours["time_to_target"] if ours["time_to_target"] else 0.0
    return out


TRAIN_LRS = {"nanoseek": (6e-3, 1.2e-2, 2.4e-2), "transformers": (1e-3, 2e-3, 4e-3)}  # peak learning rates swept
BEST_LRS = {"nanoseek": 1.2e-2, "transformers": 2e-3}  # the best of each sweep at the defaults (docs/BENCHMARKS.md)
TRAIN_WAYS = {"nanoseek": "nanoseek pretrain defaults (Muon + AdamW, warmup + cosine to 0.1x, eager)",
              "transformers": "torch AdamW fused, betas (0.9, 0.95), weight decay 0.1, "
                              "transformers' warmup + cosine to 0, clip 1.0"}


def print_train(r):
    params = f"{r['params_total'] / 1e6:.1f}M total, {r['params_active'] / 1e6:.1f}M active"
    print(f"bench train: size {r['size']} ({params}), batch {r['batch']} x {r['seq']} tokens, {r['device']} "
          f"{r['dtype']}, {r['threads']} threads; {r['steps']} steps per run (warmup {r['warmup']}), held-out loss "
          f"every {r['eval_every']} steps on {r['eval_rows']} rows")
    print(f"data: {r['train_documents']:,} worked additions and Countdown solutions, a {r['vocab_size']}-token "
          "tokenizer trained on them; the same initial weights and rows in the same order on both sides")
    print(f"matmul peak (measured): {r['peak_flops'] / 1e9:.1f} GFLOP/s")
    print(f"target: held-out loss {r['target_loss']:.4f}, the transformers way's best at the end of its run")
    for name in ("nanoseek", "transformers"):
        s = r[name]
        print(f"{name}: {s['optimizer']}")
        for lr, row in s["sweep"].items():
            reached = f"step {row['steps_to_target']}" if row["steps_to_target"] else "not reached"
            print(f"    peak lr {lr:g}: final held-out loss {row['final_loss']:.4f}, target {reached}"
                  + ("  <- best" if lr == s["best_lr"] else ""))
    for name in ("nanoseek", "transformers"):
        s = r[name]
        reached = (f"{s['steps_to_target']:4d} steps x {s['sec_per_step'] * 1000:6.1f} ms/step = "
                   f"{s['time_to_target']:6.1f} s to target" if s["time_to_target"] else "target not reached")
        print(f"{name:>13}: {reached}  {s['tokens_per_s']:7.0f} tokens/s  MFU {100 * s['mfu']:5.1f}%")
    print("time to target = steps to target x median measured s/step (each side timed in this run)")
    print(f"per-step throughput ratio (nanoseek / transformers): {r['throughput_ratio']:.2f}")
    print(f"speedup vs transformers: {r['speedup']:.2f}")
