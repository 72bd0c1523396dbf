"""Rejection sampling and SFT (DeepSeek-R1's third stage, after GRPO).

The RL model answers each of `problems` training problems `samples` times through the engine; a completion is
accepted when the task's rule checker finds its answer right and its form <reasoning></think><answer>, and at
most `keep` distinct accepted ones per problem are kept. Those, with worked solutions of the replay tasks and
plain conversational turns, become chat data on which the SFT trainer fine-tunes the same model.

    out/samples.jsonl  one line per problem: the question, the completions kept, how many sampled and accepted
    out/data/          the fine-tuning conversations, as `nanoseek data` writes them
    out/final/         the fine-tuned model; step checkpoints, metrics.jsonl and loss.png as rundir.py writes them

--resume reuses samples.jsonl and data/ as they are and continues training from the newest checkpoint in out.
Under torchrun every rank samples its share of the problems (seeds follow the problem, not the rank); all train.

This module owns the sampling, the checking, samples.jsonl and the mix of the fine-tuning data; selftrain.py
the stage's steps (generation once, data, training) that `nanoseek mtp` shares.
"""

import json
import os
import random

import torch.distributed as dist
from tqdm import tqdm

from nanoseek import checkpoint
from nanoseek.config import RSConfig, config_from
from nanoseek.engine import Engine
from nanoseek.sampling import SamplingParams
from nanoseek.selftrain import finetune, generate_once, load_model, on_ranks, training_tasks, write_data
from nanoseek.tasks import Problem, as_chat, get_tasks, parse_completion, smalltalk_chats, task_documents

BATCH = 256  # sequences the engine decodes together


# ----------------------------------------------------------------------------- sampling and checking


def draw_problems(o, tasks):
    """(index, task, problem) of the o.problems training problems, the tasks taking turns; the same on every rank."""
    rng = random.Random(o.seed)
    drawn = []
    for i in range(o.problems):
        task = tasks[i % len(tasks)]
        drawn.append((i, task, task.sample(rng, "train", o.levels)))
    return drawn


def sample_seed(seed, problem, sample, samples):
    """The seed of one completion: set by the run's seed and the problem's index, whatever the rank or batch."""
    return (seed * 1_000_003 + problem * samples + sample) & 0x7FFFFFFFFFFFFFFF


def accepted(reward):
    return reward.accuracy == 1 and reward.format == 1


def steps_all_right(task, problem, text):
    """Whether every reasoning step computes what it says (always, for a task without check_steps)."""
    if not hasattr(task, "check_steps"):
        return True
    right, steps = task.check_steps(problem, text)
    return right == steps


def judge(task, problem, completions, keep, require_steps=False):
    """The line of samples.jsonl for one problem: its `keep` shortest distinct accepted completions (finished,
    not cut at max_new_tokens; with require_steps, every step right too) and counts."""
    texts = [s.text for s in completions if s.finish_reason == "stop" and accepted(task.score(problem, s.text))
             and (not require_steps or steps_all_right(task, problem, s.text))]
    kept = sorted(dict.fromkeys(texts), key=len)[:keep]  # the shortest: the least reasoning that was enough
    return {"task": task.name, "question": problem.question, "answer": problem.answer,
            "difficulty": problem.difficulty, "completions": kept, "sampled": len(completions),
            "accepted": len(texts)}


def sample(o, compute, mine, show):
    """(index, samples.jsonl line) for each of `mine` (index, task, problem), sampled o.samples times each."""
    model, tokenizer = load_model(o)
    per_batch = max(1, BATCH // o.samples)  # problems whose completions decode together
    engine = Engine(model.to(compute.device), tokenizer, max_batch=min(BATCH, per_batch * o.samples),
                    dtype=o.dtype)
    lines = []
    with tqdm(total=len(mine), disable=not show, desc="rs sampling", dynamic_ncols=True) as bar:
        for start in range(0, len(mine), per_batch):
            batch = mine[start : start + per_batch]
            prompts = [tokenizer.render_chat(p.messages(), add_generation_prompt=True)[0] for _, _, p in batch]
            params = [SamplingParams(max_tokens=o.max_new_tokens, temperature=o.temperature,
                                     seed=sample_seed(o.seed, i, j, o.samples))
                      for i, _, _ in batch for j in range(o.samples)]
            seqs = engine.generate([p for p in prompts for _ in range(o.samples)], params)
            for k, (i, task, problem) in enumerate(batch):
                completions = seqs[k * o.samples : (k + 1) * o.samples]
                lines.append((i, judge(task, problem, completions, o.keep, o.require_steps)))
            bar.update(len(batch))
    return lines


def sample_all(o, compute, rank, world, samples_file):
    """samples.jsonl's lines, in problem order, written to samples_file by rank 0: each rank samples problems
    rank, rank + world, ..."""
    mine = draw_problems(o, training_tasks(o))[rank::world]
    lines = sample(o, compute, mine, show=rank == 0 and o.progress) if mine else []
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, lines)
        lines = [line for part in parts for line in part]
    if rank == 0:
        write_jsonl(samples_file, [line for _, line in sorted(lines, key=lambda pair: pair[0])])


def write_jsonl(path, lines):
    """Write beside, fsync, rename: a reader finds the whole file or the one before it."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def counts(lines):
    return {"problems": len(lines), "sampled": sum(r["sampled"] for r in lines),
            "accepted": sum(r["accepted"] for r in lines), "kept": sum(len(r["completions"]) for r in lines),
            "problems_solved": sum(r["accepted"] > 0 for r in lines)}


# ----------------------------------------------------------------------------- the fine-tuning data


def kept_chats(lines):
    """Each kept completion as a one-turn chat: its problem, then the completion's reasoning and answer."""
    chats = []
    for r in lines:
        problem = Problem(r["question"], r["answer"], r["difficulty"])
        for text in r["completions"]:
            reasoning, answer, _ = parse_completion(text)
            chats.append(as_chat(problem, reasoning, answer))
    return chats


def build_data(o, lines, out_dir):
    """Write the chats to fine-tune on to out_dir (see selftrain.write_data): the kept completions, worked
    solutions of the replay tasks and smalltalk turns, whose thanks follow one of the others."""
    rng = random.Random(o.seed)
    chats = kept_chats(lines)
    for i, spec in enumerate(o.replay):
        docs = task_documents(spec, o.replay_problems, "chat", o.seed * 100 + i + 1, o.levels, o.checker)
        chats += [messages for _, messages in docs]
    problems = list(chats)
    if o.smalltalk:
        chats += smalltalk_chats(get_tasks(o.task, o.checker) + get_tasks(o.replay, o.checker), o.smalltalk, rng)
    write_data(o, chats, rng, out_dir, "only {} conversation to fine-tune on: sample more problems (--problems, "
               "--samples) or mix in worked solutions (--replay)", problems)


# ----------------------------------------------------------------------------- the stage


def check(o):
    if not o.init or not o.out:
        raise ValueError("--init (the RL checkpoint) and --out are required")
    for name in ("problems", "samples", "keep", "turns"):
        if getattr(o, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")


def no_accepted_error(c):
    return ValueError(
        f"rejection sampling: the model solves none of the {c['problems']} sampled problems (none of "
        f"{c['sampled']} completions was right and well formed); sample more (--samples), start from a stronger "
        "model (--init: more SFT or GRPO) or make the problems easier (--difficulty)")


def run_stage(o, compute, rank, world):
    """Sample once, say what was kept, fine-tune on it; the counts, the training's steps and tokens."""
    samples_file = os.path.join(o.out, "samples.jsonl")
    _, seconds = generate_once(o, compute, samples_file, lambda: sample_all(o, compute, rank, world, samples_file))
    c = counts(read_jsonl(samples_file))
    if rank == 0:
        print(f"rejection sampling: kept {c['kept']} of {c['sampled']} completions ({c['accepted']} accepted) "
              f"from {c['problems_solved']} of {c['problems']} problems")
    if not c["accepted"]:  # nothing of the model's own to keep: the mixed-in conversations alone, or an error
        if not (o.replay or o.smalltalk):
            raise no_accepted_error(c)
        if rank == 0:
            print(f"warning: {no_accepted_error(c)}; fine-tuning on the replayed and smalltalk conversations alone")
    finetune(o, rank, lambda data_dir: build_data(o, read_jsonl(samples_file), data_dir))
    meta = checkpoint.load_meta(os.path.join(o.out, "final"))
    return {**c, "steps": meta["step"], "tokens": meta["tokens_seen"], "seconds_sampling": seconds}


def rejection_sampling(options: RSConfig | dict):
    """Sample, check, keep and fine-tune with `options` (an RSConfig, or a dict of its fields). Returns the counts
    (problems, sampled, accepted, kept, problems_solved), the fine-tuning's steps and tokens, and seconds_sampling
    (0 when resumed samples were reused)."""
    o = config_from(RSConfig, options)
    check(o)
    return on_ranks(o, run_stage)
