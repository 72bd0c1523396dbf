"""Peak memory of one GRPO update and one pretraining step on the CPU: the whole batch in one forward against
micro-batches, beside `nanoseek plan`'s estimate of the same, and how far the weights after the step moved
apart (float noise that Adam and Muon scale up to a step's size: the gradients are equal, tests/test_rl.py and
tests/test_train.py).

Each case runs in a process of its own; its peak is the process's peak RSS (ru_maxrss) less its RSS just
before the step. Usage: python benchmarks/memory.py [--size 4] [--rollouts 64] [--length 256]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import torch


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def grpo_case(ckpt, micro, rollouts, length, out):
    from nanoseek.config import RLConfig
    from nanoseek.rl import GRPO, Group

    o = RLConfig(init=ckpt, out=out + "_run", task="addition", prompts=rollouts // 8, group=8, micro_batch=micro,
                 device="cpu", progress=False, lr=1e-3)
    trainer = GRPO(o)
    gen = torch.Generator().manual_seed(0)
    prompt = length // 4
    kept = [Group(torch.randint(3, 300, (prompt,), generator=gen).tolist(),
                  [SimpleNamespace(tokens=torch.randint(3, 300, (length - prompt,), generator=gen).tolist())
                   for _ in range(8)], [], [float(i % 2) for i in range(8)]) for _ in range(rollouts // 8)]
    before = rss()
    trainer.update(kept, 0)
    return peak_rss() - before, trainer.model


def pretrain_case(ckpt, device_batch, rows, length, out):
    from nanoseek import checkpoint
    from nanoseek.config import TrainConfig
    from nanoseek.data import build
    from nanoseek.tasks import task_documents
    from nanoseek.train import Trainer

    _, tok = checkpoint.load(ckpt)
    data = out + "_data"
    build([], tok, data, documents=task_documents("addition", 4000, kind="text", difficulty=3))
    o = TrainConfig(init=ckpt, data=data, out=out + "_run", batch=rows, seq=length, device_batch=device_batch,
                    device="cpu", progress=False)
    trainer = Trainer(o, "pretrain")
    batches = trainer.next_batches()
    before = rss()
    trainer.train_step(batches)
    trainer.opt.step()
    return peak_rss() - before, trainer.model


def child(args):
    case = grpo_case if args.case == "grpo" else pretrain_case
    peak, model = case(args.ckpt, args.micro, args.rows, args.length, args.out)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, args.out + ".pt")
    print(json.dumps({"peak": peak}))


def run_case(case, ckpt, micro, rows, length, tmp):
    out = os.path.join(tmp, f"{case}_{micro}")
    cmd = [sys.executable, __file__, "--child", case, "--ckpt", ckpt, "--micro", str(micro), "--rows", str(rows),
           "--length", str(length), "--out", out]
    env = {**os.environ, "NANOSEEK_COMPILE": "0"}
    result = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak"], torch.load(out + ".pt")


def estimate(case, ckpt, micro, rows, length):
    """The plan's peak for this step (nanoseek.plan's own rows) less what exists before it: the weights, and
    for GRPO the rollouts' cache, which this step does not make."""
    from nanoseek import checkpoint, plan
    from nanoseek.config import RLConfig, TrainConfig

    model = checkpoint.load(ckpt)[0]
    dev = plan.Device("cpu", 1.0, 0, 1, 4, True)
    if case == "grpo":
        o = {**vars(RLConfig()), "prompts": rows // 8, "group": 8, "micro_batch": micro,
             "max_new_tokens": length - plan.PROMPT_TOKENS}
        row = plan.grpo_stage(o, model, dev)
    else:
        o = {**vars(TrainConfig()), "batch": rows, "seq": length, "device_batch": micro}
        row = plan.training_stage("pretrain", o, model, dev)
    return row["peak"] - row["cache"] - 4 * plan.parameter_split(model)[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=4)
    p.add_argument("--rollouts", type=int, default=64, help="GRPO: rollouts in the update")
    p.add_argument("--rows", type=int, default=16, help="pretraining: rows in the batch")
    p.add_argument("--length", type=int, default=256, help="tokens per rollout or row")
    p.add_argument("--child")
    p.add_argument("--ckpt")
    p.add_argument("--micro", type=int)
    p.add_argument("--out")
    args = p.parse_args()
    if args.child:
        args.case = args.child
        return child(args)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "init")
        subprocess.run([sys.executable, "-m", "nanoseek", "init", "--size", str(args.size), "--out", ckpt],
                       check=True, capture_output=True)
        for case, rows, micros in (("grpo", args.rollouts, (0, 8)), ("pretrain", args.rows, (0, 2))):
            results = {m: run_case(case, ckpt, m, rows, args.length, tmp) for m in micros}
            (whole, weights), (part, part_weights) = results[micros[0]], results[micros[1]]
            diff = max(float((part_weights[k] - weights[k]).abs().max()) for k in weights)
            for m in micros:
                planned = estimate(case, ckpt, m, rows, args.length)
                print(f"{case}: {rows} rows of {args.length} tokens, micro-batch {m or rows}: peak "
                      f"{results[m][0] / 2**20:,.0f} MiB measured; the plan's activations, logits, gradients and "
                      f"optimizer state (made by the step) {planned / 2**20:,.0f} MiB")
            print(f"{case}: micro-batch {micros[1]} peak / whole batch: {part / whole:.2f}; largest weight "
                  f"difference after the step {diff:.1e}")


if __name__ == "__main__":
    main()
