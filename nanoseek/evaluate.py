"""Held-out evaluation: pass@1 (greedy) and pass@k per task and difficulty, with 95% Wilson intervals.

    nanoseek eval CKPT [CKPT ...] --task countdown --n 500 --k 8 --k-n 200 --second-turn --out runs/eval
    -> eval.json, eval.md (one table, checkpoints side by side), eval.png

Greedy completions that hit the token limit are counted (`truncated`) and warned about; max_new_tokens 0 sizes
the limit per task from its worked solutions. --second-turn also asks every problem after a first turn of
another task, as chat clients send history (the first answer without its reasoning).
"""

import json
import math
import os
import random
import time
from math import comb

from nanoseek.checkpoint import load
from nanoseek.device import choose_compute
from nanoseek.engine import Engine
from nanoseek.model import trained_context
from nanoseek.sampling import SamplingParams
from nanoseek.tasks import as_chat, get_task
from nanoseek.tasks.smalltalk import HELD_OUT_PROMPTS, KINDS, reply_kind, smalltalk_turn, thought_kind
from nanoseek.text import DEFAULT_REPETITION_STOP
from nanoseek.tokenizer import trim_conversation

SLICES = ("lengths", "phrasing")  # problem data the report breaks accuracy down by, where a task has it
BATCH = 128  # sequences decoded at once (one compiled graph at any batch): fewer decode steps than smaller batches


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
    """n held-out problems, the same for every checkpoint: seeded, from the test split only. A task with strata
    (addition: every pair of operand lengths) gets each stratum in turn, so every one is asked n / strata times."""
    rng = random.Random(seed)
    strata = task.strata(difficulty) if hasattr(task, "strata") else [difficulty]
    return [task.sample(rng, "test", strata[i % len(strata)]) for i in range(n)]


def evaluate_model(engine, task, problems, k=1, max_new_tokens=256, seed=0, k_n=0, conversations=None,
                   temperature=0.0):
    """Per-problem results: the correctness of the greedy completion (with temperature > 0, of one seeded sample
    at it), its format and truncation, thinking length, and for the first k_n problems (0: all) the correctness of
    k samples at temperature 1. conversations: the messages each problem is asked with (default: the problem
    alone)."""
    tokenizer = engine.tokenizer
    conversations = conversations or [p.messages() for p in problems]
    prompts = [tokenizer.render_chat(m, add_generation_prompt=True)[0] for m in conversations]
    greedy = engine.generate(prompts, SamplingParams(max_tokens=max_new_tokens, temperature=0) if not temperature
                             else [SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                                  seed=2**32 + seed * 1_000_003 + i)  # apart from pass@k's seeds
                                   for i in range(len(prompts))])
    sampled = min(k_n, len(problems)) if k_n > 0 else len(problems)
    samples = []
    if k > 1:
        params = [SamplingParams(max_tokens=max_new_tokens, temperature=1.0, seed=seed * 1_000_003 + i * k + j)
                  for i in range(sampled) for j in range(k)]
        samples = engine.generate([p for p in prompts[:sampled] for _ in range(k)], params)
    rows = []
    for i, (p, g) in enumerate(zip(problems, greedy)):
        reward = task.score(p, g.text)
        thinking = g.tokens.index(tokenizer.end_think_id) if tokenizer.end_think_id in g.tokens else len(g.tokens)
        mine = samples[i * k : (i + 1) * k]
        correct = sum(task.score(p, s.text).accuracy for s in mine) if k > 1 and i < sampled else None
        right_steps, steps = task.check_steps(p, g.text) if hasattr(task, "check_steps") else (0, 0)
        refused = task.refused_calls(g.text) if hasattr(task, "refused_calls") else 0
        rows.append({"difficulty": p.difficulty, **{key: p.data[key] for key in SLICES if key in p.data},
                     "steps": steps, "wrong_steps": steps - right_steps - refused, "refused_calls": refused,
                     "attempts": task.attempts(g.text) if hasattr(task, "attempts") else None,
                     "correct": reward.accuracy, "format": reward.format,
                     "truncated": g.finish_reason == "length", "thinking_tokens": thinking,
                     "sample_correct": correct, "question": p.question, "completion": g.text,
                     "reason": reward.reason, "generated_tokens": len(g.tokens) + sum(len(s.tokens) for s in mine)})
    return rows


def worked(task, problem):
    """task.solve(problem) -> (reasoning, answer), or None where the task cannot work it."""
    try:
        return task.solve(problem)
    except Exception:  # a task's own code, or none (a JSONL task may have no worked solutions)
        return None


def token_budget(task, problems, tokenizer, fallback=256, floor=64):
    """max_new_tokens 0: twice the tokens of the longest worked solution among the problems, rendered as the
    assistant's part of the chat, at least floor; fallback where the task cannot work a problem."""
    longest = 0
    for p in problems:
        solution = worked(task, p)
        if solution is None:
            return fallback
        full = tokenizer.render_chat(as_chat(p, *solution))[0]
        longest = max(longest, len(full) - len(tokenizer.render_chat(p.messages(), add_generation_prompt=True)[0]))
    return max(floor, 2 * longest)


def second_turns(tasks, levels, problems, seed):
    """Per task, its problems each as the second user turn of a conversation whose first turn is a held-out
    problem of the next task in the list (cyclically) and its answer alone, with no reasoning: history as chat
    clients send it. The first turns are drawn with seed + 1, apart from the problems themselves."""
    out = []
    for i, mine in enumerate(problems):
        other, level = tasks[(i + 1) % len(tasks)], levels[(i + 1) % len(tasks)]
        firsts = test_problems(other, len(mine), seed + 1, level)
        out.append([[*f.messages(), {"role": "assistant", "content": right_answer(other, f)}, *p.messages()]
                    for p, f in zip(mine, firsts)])
    return out


def right_answer(task, problem):
    """The answer a right completion gives (countdown's is an expression, not the target), else the reference."""
    solution = worked(task, problem)
    return solution[1] if solution else problem.answer


DEPTHS = range(2, 11)  # turn depths the report asks a problem at (1: the problem alone)


def mixed_history(k, tasks, levels, rng):
    """k earlier turns of mixed kinds, as a chat client sends them back (replies without their thinking): held-out
    problems of the tasks with their right answers, greetings, thanks, questions about the model and requests it
    cannot help with, with the replies SFT teaches. A greeting only opens a conversation; a thanks follows an
    answer."""
    messages, answered = [], False
    while len(messages) < 2 * k:
        if rng.random() < 0.5:
            i = rng.randrange(len(tasks))
            problem = tasks[i].sample(rng, "test", levels[i])
            messages += [*problem.messages(), {"role": "assistant", "content": right_answer(tasks[i], problem)}]
            answered = True
            continue
        question, thought, reply = smalltalk_turn(tasks, rng)
        kind = thought_kind(thought)
        if (kind == "greeting" and messages) or (kind == "thanks" and not answered):
            continue
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        answered = False
    return messages


def deep_turns(tasks, levels, problems, depth_n, tokenizer, context, seed):
    """Per task, {depth: [(index of the problem, conversation)]}: the first depth_n of its problems (of its first
    difficulty, where it is evaluated at several: Countdown deep at its main size) asked as turn 10, and
    depth_n // 3 at each turn 2..9, after mixed earlier turns (mixed_history, seeded by the depth), each trimmed
    to the trained context as `nanoseek chat` trims it."""
    out = []
    for i, mine in enumerate(problems):
        main = levels[i][0] if isinstance(levels[i], (list, tuple)) and len(levels[i]) > 1 else None
        pool = [j for j, p in enumerate(mine) if main is None or p.difficulty == main]
        by_depth = {}
        for depth in DEPTHS:
            rng = random.Random(seed * 1_000_003 + 1009 * depth + i)
            asked = pool[: depth_n if depth == DEPTHS[-1] else max(1, depth_n // 3)]
            by_depth[depth] = [(j, trim_conversation(tokenizer, mixed_history(depth - 1, tasks, levels, rng)
                                                     + mine[j].messages(), context)[0]) for j in asked]
        out.append(by_depth)
    return out


def summarize(rows, k):
    """pass@1, format, truncated and thinking length over the rows; pass@k over those with samples, and their
    count as pass@k_n."""
    n = len(rows)
    right = sum(r["correct"] for r in rows)
    lo, hi = wilson(right, n)
    out = {"n": n, "pass@1": right / n if n else 0.0, "pass@1_ci": [lo, hi],
           "format": sum(r["format"] for r in rows) / n if n else 0.0,
           "truncated": sum(r["truncated"] for r in rows) / n if n else 0.0,
           "thinking_tokens": sum(r["thinking_tokens"] for r in rows) / n if n else 0.0}
    if any(r.get("steps") for r in rows):
        out["steps"], out["wrong_steps"] = sum(r["steps"] for r in rows), sum(r["wrong_steps"] for r in rows)
        out["refused_calls"] = sum(r["refused_calls"] for r in rows)
    if any(r.get("attempts") is not None for r in rows):
        out["attempts"] = sum(r["attempts"] for r in rows) / n
    sampled = [r for r in rows if r["sample_correct"] is not None]
    if k > 1 and sampled:
        est = [pass_at_k(k, int(r["sample_correct"]), k) for r in sampled]
        out[f"pass@{k}"] = sum(est) / len(sampled)
        out[f"pass@{k}_ci"] = list(wilson(sum(est), len(sampled)))
        out[f"pass@{k}_n"] = len(sampled)
    return out


def evaluate(checkpoints, tasks, n=100, k=1, max_new_tokens=256, seed=0, out=None, device=None, checker="exact",
             difficulty=None, dtype=None, k_n=0, second_turn=False, depth_n=0, temperature=0.0):
    """Evaluate each checkpoint on each task's held-out problems; write eval.json/.md/.png to out.
    difficulty: one for every task, or {task: difficulty}. k_n: how many of the n problems get the k samples
    (0: all). max_new_tokens 0: a budget per task from its worked solutions (token_budget). second_turn: also
    ask each problem after a problem of the next task in the list and its answer (greedy only). depth_n: also ask
    the last checkpoint problems as turns 2..10 of a mixed conversation (deep_turns). temperature > 0: every
    pass@1 is one seeded sample a problem at it instead of the greedy completion."""
    compute = choose_compute(device, dtype)
    loaded = [get_task(spec, checker) for spec in tasks]
    levels = [difficulty.get(spec) if isinstance(difficulty, dict) else difficulty for spec in tasks]
    problems = [test_problems(task, n, seed, level) for task, level in zip(loaded, levels)]
    histories = second_turns(loaded, levels, problems, seed) if second_turn else [None] * len(loaded)
    results = {}
    for ckpt in checkpoints:
        model, tokenizer = load(ckpt, compute.device)
        if tokenizer is None:
            raise ValueError(f"{ckpt} has no tokenizer; evaluate checkpoints made by nanoseek")
        engine = Engine(model, tokenizer, max_batch=BATCH, dtype=dtype)
        context = trained_context(model.config)
        deep = [{}] * len(loaded)
        if depth_n and ckpt == checkpoints[-1]:  # the model a person chats with
            deep = deep_turns(loaded, levels, problems, depth_n, tokenizer, context, seed)
        results[ckpt] = {}
        for task, mine, history, by_depth in zip(loaded, problems, histories, deep):
            budget = max_new_tokens or token_budget(task, mine, tokenizer)
            start = time.perf_counter()
            rows = evaluate_model(engine, task, mine, k, budget, seed, k_n, temperature=temperature)
            rows2 = (evaluate_model(engine, task, mine, 1, budget, seed, conversations=history,
                                    temperature=temperature) if history else [])
            depth_rows = {depth: evaluate_model(engine, task, [mine[j] for j, _ in asked], 1, budget, seed,
                                                conversations=[c for _, c in asked], temperature=temperature)
                          for depth, asked in by_depth.items()}
            if depth_rows:  # turn 1: the deepest turn's problems, asked alone
                depth_rows = {1: [rows[j] for j, _ in by_depth[DEPTHS[-1]]], **depth_rows}
            seconds = time.perf_counter() - start
            results[ckpt][task.name] = {**task_results(rows, rows2, k, budget, seconds, depth_rows),
                                        "temperature": temperature}
            if depth_rows:
                results[ckpt][task.name]["context"] = context
    if out:
        write_results(results, k, out)
    return results


def task_results(rows, rows2, k, budget, seconds, depth_rows=None):
    """One task's entry of eval.json: all problems, each difficulty and slice, examples, the budget, generation
    speed, with rows2 the second-turn summary, and with depth_rows ({depth: rows}, 1: the deepest turn's problems
    asked alone) each turn depth's summary."""
    depth_rows = depth_rows or {}
    deep = [r for depth, d in depth_rows.items() if depth > 1 for r in d]
    tokens = sum(r["generated_tokens"] for r in rows + rows2 + deep)
    by_difficulty = {str(d): summarize([r for r in rows if r["difficulty"] == d], k)
                     for d in sorted({r["difficulty"] for r in rows})}
    slices = {key: {value: summarize([r for r in rows if r.get(key) == value], 1)
                    for value in sorted({r[key] for r in rows if key in r})} for key in SLICES}
    out = {"all": summarize(rows, k), "by_difficulty": by_difficulty, "max_new_tokens": budget,
           **{f"by_{key}": by_value for key, by_value in slices.items() if by_value},
           "examples": rows[:3], "generation": {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}}
    if rows2:
        out["second_turn"] = summarize(rows2, 1)
    if depth_rows:
        out["by_depth"] = {str(depth): summarize(d, 1) for depth, d in depth_rows.items()}
        out["deep_replies"] = depth_cleanliness(deep)
    return out


CONTROL_TEXT = ("<｜", "｜>", "<think>", "</think>")  # chat-template and tool tokens, as text


def depth_cleanliness(rows):
    """How many of the deep-turn replies leak chat-template or tool tokens into the answer, or run to the limit."""
    leaked = sum(any(t in r["completion"].partition("</think>")[2] for t in CONTROL_TEXT) for r in rows)
    return {"n": len(rows), "leaked": leaked, "truncated": sum(r["truncated"] for r in rows)}


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
    """The checkpoints side by side per task and difficulty, a warning per checkpoint and task whose greedy
    traces hit the token limit, generation speed, and the second-turn table when there is one."""
    ckpts = list(results)
    lines = ["| task | difficulty | " + " | ".join(_short(c) for c in ckpts) + " |",
             "|---|---|" + "---|" * len(ckpts)]
    tasks = list(next(iter(results.values())))
    for t in tasks:
        for d in ["all", *results[ckpts[0]][t]["by_difficulty"]]:
            cells = [task_cell(results[c][t]["all"] if d == "all" else results[c][t]["by_difficulty"][d], k)
                     for c in ckpts]
            lines.append(f"| {t} | {d} | " + " | ".join(cells) + " |")
    speed = [f"- {_short(c)}, {t}: {g['tokens']:,} tokens generated in {g['seconds']:.1f} s, "
             f"{g['tokens_per_s']:,.0f} tok/s" for c in ckpts for t in tasks if (g := results[c][t].get("generation"))]
    temperature = next(iter(results[ckpts[0]].values())).get("temperature", 0.0)
    how = f"one sample a problem at temperature {temperature:g}" if temperature else "greedy"
    text = f"pass@1 ({how}) with 95% Wilson interval\n\n" + "\n".join(lines) + "\n\n"
    warnings = truncation_warnings(results)
    if warnings:
        text += "\n".join(warnings) + "\n\n"
    text += "\n".join(speed) + "\n"
    second = second_turn_table(results)
    return text + ("\n" + second if second else "") + slice_tables(results) + depth_table(results)


def depth_table(results):
    """Each task's greedy pass@1 asked alone (depth 1) and as turn 2..10 of a mixed conversation."""
    rows, context, n10, n2 = [], None, 0, 0
    for t in next(iter(results.values())):
        for c, by_task in results.items():
            if "by_depth" not in (r := by_task[t]):
                continue
            context, depths = r["context"], r["by_depth"]
            n10, n2 = depths["10"]["n"], depths["2"]["n"]
            cells = [f"{100 * s['pass@1']:.1f}" for s in depths.values()]
            clean = r["deep_replies"]
            rows.append(f"| {t} | {_short(c)} | " + " | ".join(cells)
                        + f" | {_pass1(depths['1'])} (n={depths['1']['n']})"
                        f" | {_pass1(depths['10'])} | {clean['leaked']} / {clean['truncated']} of {clean['n']} |")
    if not rows:
        return ""
    head = " | ".join(str(d) for d in [1, *DEPTHS])
    return (f"\nTurn depth: each problem asked as turn d of a conversation of mixed turns (problems with their "
            f"answers, greetings, thanks, questions about the model, requests it cannot help with), trimmed to the "
            f"{context} tokens the model was trained on as `nanoseek chat` trims it (greedy pass@1 %, {n10} problems "
            f"at turns 1 and 10, {n2} between; the last column counts deep replies with template or tool tokens in "
            f"their answer / run to the token limit)\n\n| task | checkpoint | {head} | turn 1 | turn 10 | leaked / "
            f"truncated |\n|---|---|" + "---|" * (len(DEPTHS) + 4) + "\n" + "\n".join(rows) + "\n")


SLICE_TITLES = {"lengths": "digits of the two operands", "phrasing": "phrasing"}


def slice_tables(results):
    """Per task and slice key (operand lengths, phrasing), greedy pass@1 of every value side by side, and the
    worst value of each checkpoint: what a person asking that way gets."""
    ckpts, text = list(results), ""
    for t in next(iter(results.values())):
        for key, title in SLICE_TITLES.items():
            values = results[ckpts[0]][t].get(f"by_{key}")
            if not values:
                continue
            text += (f"\n{t} by {title} (greedy pass@1, 95% Wilson interval)\n\n| {key} | "
                     + " | ".join(_short(c) for c in ckpts) + " |\n|---|" + "---|" * len(ckpts) + "\n")
            for value in values:
                cells = [f"{_pass1(s)} (n={s['n']})" for c in ckpts if (s := results[c][t][f"by_{key}"].get(value))]
                text += f"| {value} | " + " | ".join(cells) + " |\n"
            worst = [min(results[c][t][f"by_{key}"].items(), key=lambda kv: kv[1]["pass@1"]) for c in ckpts]
            text += "| worst | " + " | ".join(f"{v}: {100 * s['pass@1']:.1f}%" for v, s in worst) + " |\n"
    return text


def task_cell(s, k):
    """A task's summary as one table cell: pass@1 with its interval, pass@k, truncation, attempts, steps."""
    cell = _pass1(s)
    if k > 1 and f"pass@{k}" in s:  # pass@1 is the cell's first figure
        of = f" (n={s[f'pass@{k}_n']})" if s.get(f"pass@{k}_n", s["n"]) != s["n"] else ""
        cell += f", pass@{k} {100 * s[f'pass@{k}']:.1f}%{of}"
    if s.get("truncated"):
        cell += f", truncated {100 * s['truncated']:.3g}%"
    if "attempts" in s:
        cell += f", {s['attempts']:.2f} attempts"
    if "steps" in s:
        cell += f", {s['wrong_steps']} of {s['steps']} steps wrong"
        if s.get("refused_calls"):
            cell += f", {s['refused_calls']} calls refused"
    return cell + f", format {100 * s['format']:.0f}%, think {s['thinking_tokens']:.0f} tok (n={s['n']})"


def truncation_warnings(results):
    """A line per checkpoint and task whose greedy completions hit max_new_tokens: their accuracy is understated."""
    return [f"warning: {100 * r['all']['truncated']:.3g}% of {_short(c)}'s {t} traces hit "
            f"max_new_tokens={r['max_new_tokens']}: accuracy is understated; raise [eval] max_new_tokens "
            f"(--max-new-tokens of nanoseek eval)"
            for c, by_task in results.items() for t, r in by_task.items() if r["all"].get("truncated")]


def second_turn_table(results):
    """Each task's greedy pass@1 asked alone and asked as the second turn of a conversation ('' without one)."""
    rows = [f"| {t} | {_short(c)} | {_pass1(r['all'])} | {_pass1(r['second_turn'])} |"
            for t in next(iter(results.values())) for c, by_task in results.items()
            if "second_turn" in (r := by_task[t])]
    if not rows:
        return ""
    return ("Second turn: each problem asked after a problem of another task and its answer (greedy pass@1, 95% "
            "Wilson interval)\n\n| task | checkpoint | first turn pass@1 | second turn pass@1 |\n|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


def _pass1(s):
    return f"{100 * s['pass@1']:.1f}% [{100 * s['pass@1_ci'][0]:.1f}, {100 * s['pass@1_ci'][1]:.1f}]"


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



# ----------------------------------------------------------------------------- chat


GREETINGS = ("hello", "who are you?", "what can you do?")
ANSWERED = [{"role": "user", "content": "What is 340 + 127?"}, {"role": "assistant", "content": "467"}]  # what a
# thanks follows when the report asks one


def chat_replies(ckpt, prompts=GREETINGS + tuple(HELD_OUT_PROMPTS), max_tokens=256, device=None, dtype=None):
    """Greedy one-turn replies of a checkpoint, stopped as `nanoseek chat` stops them (the repetition stop on),
    and how often it recognises what a conversational prompt of SFT's smalltalk is -> {"replies": [{prompt,
    completion, finish_reason, tokens}], "kinds": {kind: {"right", "of", "missed"}}}. The default prompts are a
    greeting, two questions about the model and 20 requests it never trained on; a smalltalk prompt (each one
    of every kind, as written: lowercase, no punctuation; a thanks after an answered question, where people say
    it) is recognised when the reply thinks its kind's thought ("A greeting.")."""
    compute = choose_compute(device, dtype)
    model, tokenizer = load(ckpt, compute.device)
    engine = Engine(model, tokenizer, max_batch=BATCH, dtype=dtype)
    render = lambda p, before=(): tokenizer.render_chat([*before, {"role": "user", "content": p}],
                                                        add_generation_prompt=True)[0]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, repetition_stop=DEFAULT_REPETITION_STOP)
    seqs = engine.generate([render(p) for p in prompts], params)
    replies = [{"prompt": p, "completion": s.text, "finish_reason": s.finish_reason, "tokens": len(s.tokens)}
               for p, s in zip(prompts, seqs)]
    asked = [(kind, p) for kind, (kind_prompts, _) in KINDS.items() for p in kind_prompts]
    thoughts = engine.generate([render(p, ANSWERED if kind == "thanks" else ()) for kind, p in asked],
                               SamplingParams(max_tokens=32, temperature=0))
    missed = [(kind, p) for (kind, p), s in zip(asked, thoughts) if reply_kind(s.text) != kind]
    kinds = {}
    for kind, (kind_prompts, _) in KINDS.items():
        mine = [p for k, p in missed if k == kind]
        kinds[kind] = {"right": len(kind_prompts) - len(mine), "of": len(kind_prompts), "missed": mine}
    return {"replies": replies, "kinds": kinds}
