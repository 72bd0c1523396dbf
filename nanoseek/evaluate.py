"""Held-out evaluation: pass@1 (greedy) and pass@k per task and difficulty, with 95% Wilson intervals.

    nanoseek eval CKPT [CKPT ...] --task countdown --n 500 --k 4 --out runs/eval
    -> eval.json, eval.md (one table, checkpoints side by side), eval.png
"""

import json
import math
import os
import random
import time
from math import comb

from nanoseek.checkpoint import load
from nanoseek.device import policy
from nanoseek.engine import Engine, SamplingParams
from nanoseek.tasks import get_task

OPTIONS = {  # every option of `nanoseek eval` beside the checkpoints: (default, meaning)
    "task": (["countdown"], "tasks (built-in names, .jsonl, file.py:Class)"),
    "checker": ("exact", "checker for JSONL tasks: exact, numeric or math"),
    "n": (500, "held-out problems per task"),
    "k": (1, "samples per problem for pass@k (1: greedy pass@1 only)"),
    "difficulty": (0, "one difficulty (0: the task's whole range)"),
    "max_new_tokens": (256, "longest completion"),
    "seed": (0, "seed of the held-out problems and the pass@k samples"),
    "out": (None, "directory for eval.json, eval.md and eval.png"),
    "device": (None, "cpu or cuda (default: cuda when available)"),
    "dtype": ("auto", "compute dtype under autocast: auto (bfloat16 on cuda, float32 on cpu), bfloat16, float32"),
}


def wilson(successes, n, z=1.96):
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return 0.0, 0.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))  # rounding never leaves p outside


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def test_problems(task, n, seed=0, difficulty=None):
    """n held-out problems, the same for every checkpoint: seeded, from the test split only."""
    rng = random.Random(seed)
    return [task.sample(rng, "test", difficulty) for _ in range(n)]


def evaluate_model(engine, task, problems, k=1, max_new_tokens=256, seed=0):
    """Per-problem results: greedy correctness and format, k samples' correctness at temperature 1, thinking
    length."""
    tokenizer = engine.tokenizer
    prompts = [tokenizer.render_chat(p.messages(), add_generation_prompt=True)[0] for p in problems]
    greedy = engine.generate(prompts, SamplingParams(max_tokens=max_new_tokens, temperature=0))
    samples = []
    if k > 1:
        params = [SamplingParams(max_tokens=max_new_tokens, temperature=1.0, seed=seed * 1_000_003 + i * k + j)
                  for i in range(len(problems)) for j in range(k)]
        samples = engine.generate([p for p in prompts for _ in range(k)], params)
    rows = []
    for i, (p, g) in enumerate(zip(problems, greedy)):
        reward = task.score(p, g.text)
        thinking = g.tokens.index(tokenizer.end_think_id) if tokenizer.end_think_id in g.tokens else len(g.tokens)
        correct = sum(task.score(p, s.text).accuracy for s in samples[i * k : (i + 1) * k]) if k > 1 else None
        generated = len(g.tokens) + sum(len(s.tokens) for s in samples[i * k : (i + 1) * k])
        rows.append({"difficulty": p.difficulty, "correct": reward.accuracy, "format": reward.format,
                     "thinking_tokens": thinking, "sample_correct": correct, "question": p.question,
                     "completion": g.text, "reason": reward.reason, "generated_tokens": generated})
    return rows


def summarize(rows, k):
    n = len(rows)
    right = sum(r["correct"] for r in rows)
    lo, hi = wilson(right, n)
    out = {"n": n, "pass@1": right / n if n else 0.0, "pass@1_ci": [lo, hi],
           "format": sum(r["format"] for r in rows) / n if n else 0.0,
           "thinking_tokens": sum(r["thinking_tokens"] for r in rows) / n if n else 0.0}
    if k > 1:
        est = [pass_at_k(k, int(r["sample_correct"]), k) for r in rows]
        out[f"pass@{k}"] = sum(est) / n
        out[f"pass@{k}_ci"] = list(wilson(sum(est), n))
    return out


def evaluate(checkpoints, tasks, n=100, k=1, max_new_tokens=256, seed=0, out=None, device=None, checker="exact",
             difficulty=None, dtype=None):
    """Evaluate each checkpoint on each task's held-out problems; write eval.json/.md/.png to out.
    difficulty: one for every task, or {task: difficulty}."""
    compute = policy(device, dtype)
    results = {}
    for ckpt in checkpoints:
        model, tokenizer = load(ckpt, compute.device)
        if tokenizer is None:
            raise ValueError(f"{ckpt} has no tokenizer; evaluate checkpoints made by nanoseek")
        engine = Engine(model, tokenizer, max_batch=32)
        results[ckpt] = {}
        for spec in tasks:
            task = get_task(spec, checker)
            level = difficulty.get(spec) if isinstance(difficulty, dict) else difficulty
            problems = test_problems(task, n, seed, level)
            start = time.perf_counter()
            with compute.autocast():
                rows = evaluate_model(engine, task, problems, k, max_new_tokens, seed)
            seconds = time.perf_counter() - start
            tokens = sum(r["generated_tokens"] for r in rows)
            by_difficulty = {}
            for d in sorted({r["difficulty"] for r in rows}):
                by_difficulty[str(d)] = summarize([r for r in rows if r["difficulty"] == d], k)
            results[ckpt][task.name] = {"all": summarize(rows, k), "by_difficulty": by_difficulty,
                                        "examples": rows[:3], "generation": {
                                            "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}}
    if out:
        write_results(results, k, out)
    return results


def write_results(results, k, out):
    """eval.md, eval.png, then eval.json (the sign that all three are there) into the directory out; each is
    written beside and renamed into place, so none is ever half written."""
    os.makedirs(out, exist_ok=True)
    for name, save in (("eval.md", lambda f: f.write(markdown_table(results, k).encode())),
                       ("eval.png", lambda f: plot(results, f)),
                       ("eval.json", lambda f: f.write(json.dumps(results, indent=2).encode()))):
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "wb") as f:
            save(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(out, name))


def markdown_table(results, k):
    ckpts = list(results)
    lines = ["| task | difficulty | " + " | ".join(_short(c) for c in ckpts) + " |",
             "|---|---|" + "---|" * len(ckpts)]
    tasks = list(next(iter(results.values())))
    for t in tasks:
        groups = [("all", results[ckpts[0]][t]["all"])] + list(results[ckpts[0]][t]["by_difficulty"].items())
        for d, _ in groups:
            cells = []
            for c in ckpts:
                s = results[c][t]["all"] if d == "all" else results[c][t]["by_difficulty"][d]
                cell = f"{100 * s['pass@1']:.1f}% [{100 * s['pass@1_ci'][0]:.1f}, {100 * s['pass@1_ci'][1]:.1f}]"
                if k > 1:
                    cell += f", pass@{k} {100 * s[f'pass@{k}']:.1f}%"
                cell += f", format {100 * s['format']:.0f}%, think {s['thinking_tokens']:.0f} tok (n={s['n']})"
                cells.append(cell)
            lines.append(f"| {t} | {d} | " + " | ".join(cells) + " |")
    speed = [f"- {_short(c)}, {t}: {g['tokens']:,} tokens generated in {g['seconds']:.1f} s, "
             f"{g['tokens_per_s']:,.0f} tok/s" for c in ckpts for t in tasks if (g := results[c][t].get("generation"))]
    return ("pass@1 (greedy) with 95% Wilson interval\n\n" + "\n".join(lines) + "\n\n"
            + "\n".join(speed) + "\n")


def _short(path):
    parts = os.path.normpath(path).split(os.sep)
    return "/".join(parts[-2:])


def plot(results, file):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ckpts = list(results)
    tasks = list(results[ckpts[0]])
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(tasks) * len(ckpts)), 3.5))
    width = 0.8 / len(ckpts)
    for i, c in enumerate(ckpts):
        vals = [results[c][t]["all"]["pass@1"] for t in tasks]
        errs = [[v - results[c][t]["all"]["pass@1_ci"][0] for v, t in zip(vals, tasks)],
                [results[c][t]["all"]["pass@1_ci"][1] - v for v, t in zip(vals, tasks)]]
        ax.bar([j + i * width for j in range(len(tasks))], vals, width, yerr=errs, label=_short(c), capsize=3)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
    ax.set(ylabel="pass@1 (greedy)", ylim=(0, 1), title="held-out accuracy, 95% intervals")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(file, dpi=100, format="png")
    plt.close(fig)

