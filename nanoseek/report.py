"""The report card of a run: report.md in the run folder, with its plots beside it."""

import json
import os
import platform
import time

import torch

from nanoseek.device import choose_compute, world_size
from nanoseek.rundir import read_metrics


def _load(path, default=None):
    return json.load(open(path)) if os.path.exists(path) else default


def write_report(recipe, paths):
    out = recipe["run"]["out"]
    timings = _load(os.path.join(out, "stages.json"), {})
    results = _load(os.path.join(paths["eval"], "eval.json"), {})
    lines = [f"# nanoseek report: {os.path.basename(recipe['path'])}", ""]
    compute = choose_compute(recipe["run"]["device"] or None, recipe["run"]["dtype"])
    ranks = f" x {world_size()} ranks" if world_size() > 1 else ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # taskset counts
    lines.append(f"Written {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()} with {cores} cores "
                 f"({torch.get_num_threads()} torch threads), torch {torch.__version__}, device {compute.device}"
                 f"{ranks}, compute dtype {str(compute.dtype).removeprefix('torch.')}.")
    lines.append("")

    # stages
    lines += ["## Stages", "", "| stage | time | tokens | steps | result |", "|---|---|---|---|---|"]
    total = 0.0
    for stage in ("tokenizer", "data", "pretrain", "sft", "rl", "rs", "eval"):
        t = timings.get(stage)
        if not t:
            continue
        total += t["seconds"]
        tokens = t.get("tokens") or t.get("pretrain_tokens")
        result = ""
        if stage == "tokenizer":
            result = f"{t['vocab_size']} tokens"
        elif stage == "data":
            result = f"{t['pretrain_tokens']:,} pretraining and {t['sft_tokens']:,} SFT tokens"
        elif stage in ("pretrain", "sft") and t.get("val_loss") is not None:
            result = f"held-out loss {t['val_loss']:.3f}, {t['val_bpb']:.3f} bits/byte"
        elif stage == "rl":
            result = f"last step: reward {t['reward']:.3f}, rollout accuracy {t['accuracy']:.3f}"
        elif stage == "rs":
            result = f"kept {t['kept']:,} of {t['sampled']:,} sampled completions"
        tokens = f"{tokens:,}" if isinstance(tokens, int) else ""
        lines.append(f"| {stage} | {t['seconds']:.0f} s | {tokens} | {t.get('steps', '')} | {result} |")
    lines += ["", f"Total: {total:.0f} s ({total / 60:.1f} min).", ""]
    pt = timings.get("pretrain", {})
    if pt.get("params_total"):
        lines += [f"Model: {pt['params_total']:,} parameters, {pt['params_active']:,} active per token.", ""]

    # accuracy: the table `nanoseek eval` wrote
    if results:
        with open(os.path.join(paths["eval"], "eval.md")) as f:
            table = f.read()
        lines += ["## Held-out accuracy", "", "On problems from the test split (never trained on).", "", table,
                  "![accuracy](eval/eval.png)", ""]

    # curves
    lines += ["## Curves", ""]
    for stage, png, title in (("pretrain", "loss.png", "pretraining loss"), ("sft", "loss.png", "SFT loss"),
                              ("rl", "rl.png", "GRPO reward, held-out accuracy, length and policy statistics"),
                              ("rs", "loss.png", "rejection-sampling SFT loss"),
                              ("pretrain", "experts.png", "expert load balance during pretraining")):
        if stage in paths and os.path.exists(os.path.join(paths[stage], png)):
            lines += [f"{title}:", "", f"![{title}]({os.path.relpath(os.path.join(paths[stage], png), out)})", ""]

    # expert balance
    metrics = os.path.join(paths["pretrain"], "metrics.jsonl")
    rows = [r for r in read_metrics(metrics) if r.get("expert_imbalance")] if os.path.exists(metrics) else []
    if rows:
        first, last = rows[0]["expert_imbalance"], rows[-1]["expert_imbalance"]
        lines += ["## Expert load balance", "",
                  "max / mean tokens per routed expert in each MoE layer (1.0 is perfect balance), first and last "
                  "pretraining step, with auxiliary-loss-free bias updates:", "",
                  "| MoE layer | first step | last step |", "|---|---|---|"]
        lines += [f"| {i} | {a:.2f} | {b:.2f} |" for i, (a, b) in enumerate(zip(first, last))]
        lines.append("")

    # transcripts
    if results:
        final = list(results)[-1]
        lines += ["## Transcripts", "", f"Greedy completions of `{final}` on held-out problems:", ""]
        for task, r in results[final].items():
            for ex in r["examples"][:2]:
                lines += [f"**{task}**: {ex['question']}", "", "```", ex["completion"].strip(), "```",
                          f"→ {ex['reason']}", ""]
    lines += chat_section(_load(os.path.join(paths["eval"], "chat.json")))
    report = os.path.join(out, "report.md")
    with open(report + ".tmp", "w") as f:  # written beside and renamed: a reader never sees half a report
        f.write("\n".join(lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(report + ".tmp", report)
    return report


def chat_section(chat):
    """The final model's greedy replies to a greeting and two questions about it, and how its replies to
    requests it never trained on ended (an answer, the repetition stop, or the token limit)."""
    if not chat:
        return []
    replies = chat["replies"]
    lines = ["## Chat", "", f"Greedy one-turn replies of `{chat['checkpoint']}`, stopped as `nanoseek chat` stops "
             "them:", ""]
    for r in replies[:3]:
        lines += [f"**you**: {r['prompt']}", "", "```", r["completion"].strip(), "```", ""]
    others = replies[3:]
    ends = {reason: sum(r["finish_reason"] == reason for r in others) for reason in ("stop", "repetition", "length")}
    lines += [f"{len(others)} requests it never trained on (\"describe a sunset\", \"who wrote hamlet\", ...): "
              f"{ends['stop']} answered and stopped, {ends['repetition']} stopped for repeating themselves, "
              f"{ends['length']} ran to the token limit; longest reply {max(r['tokens'] for r in others)} tokens.", ""]
    kinds = chat.get("kinds")
    if kinds:
        counts = ", ".join(f"{kind} {k['right']} of {k['of']}" for kind, k in kinds.items())
        lines += ["SFT's conversational prompts, each asked as written (lowercase, no punctuation; a thanks after a "
                  f"question and its answer), recognised as their kind (the reply's thought): {counts}."]
        missed = [f"{kind}: {', '.join(k['missed'])}" for kind, k in kinds.items() if k["missed"]]
        lines += [f"Not recognised ({'; '.join(missed)}).", ""] if missed else [""]
    return lines
