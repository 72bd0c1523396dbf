"""`nanoseek bench decode --prompt-kind tasks`: MTP self-speculative decoding against plain decoding on held-out
prompts of a checkpoint's own tasks, two engines taking turns."""

import statistics
import time

import torch

from nanoseek import checkpoint
from nanoseek.bench.common import held_out_conversations, interleaved, spread, spread_text
from nanoseek.device import choose_compute


def task_prompts(tokenizer, tasks, n, difficulty=None):
    """held_out_conversations rendered as chat prompts (token ids)."""
    conversations = held_out_conversations(tasks, n, difficulty)
    return [tokenizer.render_chat(m, add_generation_prompt=True)[0] for m in conversations]


def timed_generate(engine, prompts, params):
    """engine.generate's sequences, its seconds, and the seconds of its decode steps alone (prefills not
    counted, as llama.cpp's tools count decoding)."""
    spent, step = [0.0], engine.step

    def timed():
        start = time.perf_counter()
        events = step()
        spent[0] += time.perf_counter() - start
        return events

    engine.step = timed  # this call's only: the instance attribute hides the method until deleted
    try:
        start = time.perf_counter()
        seqs = engine.generate(prompts, params)
        return seqs, time.perf_counter() - start, spent[0]
    finally:
        del engine.step


def bench_speculation(ckpt, tasks=("addition", "countdown"), n=50, difficulty=3, batches=(1, 16), new_tokens=256,
                      rounds=5, device=None):
    """MTP self-speculative decoding against plain decoding on held-out prompts of a checkpoint's own tasks,
    asked as chat and decoded greedily to their end by two engines of the checkpoint, taking turns for `rounds`
    rounds: acceptance, whether the tokens are identical, and tokens per second of decode steps and of whole
    requests (medians). At batch 1 every fifth prompt is decoded."""
    from nanoseek.engine import Engine
    from nanoseek.sampling import SamplingParams

    compute = choose_compute(device)
    model, tokenizer = checkpoint.load(ckpt)
    if not len(model.mtp):
        raise ValueError(f"{ckpt} has no MTP module to draft with: speculation needs one (num_nextn_predict_layers)")
    model = model.to(device=compute.device, dtype=compute.dtype).eval()
    prompts = task_prompts(tokenizer, tasks, n, difficulty)
    greedy = SamplingParams(max_tokens=new_tokens, temperature=0)
    out = {"ckpt": str(ckpt), "tasks": list(tasks), "difficulty": difficulty, "new_tokens": new_tokens,
           "rounds": rounds, "threads": torch.get_num_threads(), "device": str(compute.device), "runs": []}
    for batch in batches:
        mine = prompts if batch > 1 else prompts[::5]
        engines = {"plain": Engine(model, tokenizer, max_batch=batch, speculative=False),
                   "speculative": Engine(model, tokenizer, max_batch=batch, speculative=True)}
        for engine in engines.values():
            engine.generate(mine[: 2 * batch], greedy)  # compiles the steps for this batch
        engines["speculative"].speculator.drafted = engines["speculative"].speculator.accepted = 0
        out["runs"].append({"batch": batch, **speculation_rounds(engines, mine, greedy, rounds)})
    return out


def speculation_rounds(engines, prompts, params, rounds):
    """The plain and the speculative engine decode the prompts in turn, `rounds` times: their tok/s (median and
    range) in decode steps and in whole requests, acceptance, identical sequences, the ratios of medians."""
    finished = {}

    def side(name):
        def measure():  # -> (seconds of decode steps, seconds of whole requests)
            finished[name], seconds, decoding = timed_generate(engines[name], prompts, params)
            return decoding, seconds
        return measure

    figures = interleaved({name: side(name) for name in engines}, rounds)
    tokens = {name: [s.tokens for s in seqs] for name, seqs in finished.items()}
    n_tokens = sum(len(t) for t in tokens["plain"])
    steps = {name: [f[0] for f in figures[name]] for name in engines}
    whole = {name: [f[1] for f in figures[name]] for name in engines}
    return {"prompts": len(prompts), "tokens": n_tokens,
            **{name: {"decode_steps": spread([n_tokens / s for s in steps[name]]),
                      "whole_requests": spread([n_tokens / s for s in whole[name]])} for name in engines},
            "acceptance": engines["speculative"].acceptance_rate,
            "identical": sum(a == b for a, b in zip(tokens["plain"], tokens["speculative"])),
            "cut": sum(s.finish_reason == "length" for s in finished["plain"]),
            "speedup": statistics.median(steps["plain"]) / statistics.median(steps["speculative"]),
            "speedup_whole": statistics.median(whole["plain"]) / statistics.median(whole["speculative"])}


def print_speculation(r):
    print(f"bench decode --prompt-kind tasks: {r['ckpt']}, held-out {' and '.join(r['tasks'])} (difficulty "
          f"{r['difficulty']}) asked as chat, greedy to the end (at most {r['new_tokens']} tokens), {r['device']}, "
          f"{r['threads']} threads; tok/s, median (min-max) of {r['rounds']} rounds taking turns:")
    for row in r["runs"]:
        print(f"batch {row['batch']:>3}: {row['prompts']} prompts, {row['tokens']} tokens ({row['cut']} cut at the "
              f"limit); MTP acceptance {100 * row['acceptance']:.1f}%; identical tokens {row['identical']} of "
              f"{row['prompts']}")
        for what in ("decode_steps", "whole_requests"):
            print(f"  {what.replace('_', ' '):<15} plain {spread_text(row['plain'][what])}   "
                  f"speculative {spread_text(row['speculative'][what])}")
    for row in r["runs"]:
        print(f"speedup vs plain decoding (batch {row['batch']}, whole requests): {row['speedup_whole']:.2f}")
    for row in r["runs"]:
        print(f"speedup vs plain decoding (batch {row['batch']}): {row['speedup']:.2f}")

