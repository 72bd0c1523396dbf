"""`nanoseek bench grpo`: seconds per GRPO step, nanoseek's rl against TRL's GRPOTrainer on the same checkpoint
and settings."""

import os
import random
import statistics
import tempfile
import time

import torch

from nanoseek.bench.common import quiet_transformers


def bench_grpo(ckpt, task="addition", difficulty=2, steps=4, prompts=4, group=8, max_new_tokens=64, seed=0,
               peer="trl"):
    """Seconds per GRPO step, nanoseek's rl vs TRL's GRPOTrainer, on the same checkpoint and settings:
    prompts x group rollouts of up to max_new_tokens, one update pass, no KL, clip 0.2 / 0.28, CPU fp32."""
    if peer != "trl":
        raise ValueError(f"unknown peer {peer!r}: the GRPO benchmark compares with 'trl'")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from nanoseek.rl import rl
    from nanoseek.rundir import read_metrics
    from nanoseek.tasks import get_task

    quiet_transformers()
    spec = get_task(task)
    out = {"task": task, "steps": steps, "prompts": prompts, "group": group, "max_new_tokens": max_new_tokens,
           "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        rl({"init": ckpt, "task": task, "difficulty": difficulty, "out": os.path.join(tmp, "ours"), "steps": steps,
            "prompts": prompts, "group": group, "max_new_tokens": max_new_tokens, "lr": 1e-4, "mu": 1, "beta": 0.0,
            "dynamic_sampling": False, "ckpt_every": 0, "eval_every": 0, "progress": False, "device": "cpu",
            "seed": seed})
        rows = [r for r in read_metrics(os.path.join(tmp, "ours", "metrics.jsonl")) if "seconds" in r]  # steps
        out["nanoseek"] = {"sec_per_step": statistics.median(r["seconds"] for r in rows[1:] or rows),
                           "response_length": statistics.mean(r["response_length"] for r in rows)}

        rng = random.Random(seed)
        problems = [spec.sample(rng, "train", difficulty) for _ in range(prompts * (steps + 1))]
        by_question = {p.question: p for p in problems}
        dataset = Dataset.from_list([{"prompt": p.messages(), "question": p.question} for p in problems])

        def reward(completions, question, **_):
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return [spec.score(by_question[q], t).accuracy for t, q in zip(texts, question)]

        times, lengths = [], []

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                times.append(time.perf_counter() - self.t0)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "completions/mean_length" in logs:
                    lengths.append(logs["completions/mean_length"])

        config = GRPOConfig(
            output_dir=os.path.join(tmp, "trl"), per_device_train_batch_size=prompts * group, num_generations=group,
            max_completion_length=max_new_tokens, max_steps=steps, learning_rate=1e-4, beta=0.0, num_iterations=1,
            epsilon=0.2, epsilon_high=0.28, temperature=1.0, use_cpu=True, bf16=False, report_to=[],
            logging_steps=1, save_strategy="no", seed=seed, disable_tqdm=True)
        trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32),
                              reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=AutoTokenizer.from_pretrained(ckpt), callbacks=[Clock()])
        trainer.train()
        out["trl"] = {"sec_per_step": statistics.median(times[1:] or times),
                      "response_length": statistics.mean(lengths) if lengths else float("nan")}
    out["speedup"] = out["trl"]["sec_per_step"] / out["nanoseek"]["sec_per_step"]
    return out


def print_grpo(r):
    print(f"bench grpo: task {r['task']}, {r['prompts']} prompts x {r['group']} completions per step, up to "
          f"{r['max_new_tokens']} new tokens, {r['steps']} steps (median after the first), cpu fp32, "
          f"{r['threads']} threads")
    for name in ("nanoseek", "trl"):
        s = r[name]
        print(f"{name:>9}: {s['sec_per_step']:7.2f} s/step   mean completion {s['response_length']:.1f} tokens")
    print(f"speedup vs trl: {r['speedup']:.2f}")

