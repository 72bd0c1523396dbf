"""MTP self-speculative decoding against plain decoding on a checkpoint's own tasks: held-out problems of each
task, asked as chat, decoded greedily by two engines of the same checkpoint (compiled steps), interleaved over
several rounds. Prints the draft acceptance, whether the tokens are identical, and the speedups last: of the
decode steps alone (the prompts' prefill not timed, as `bench decode` times llama.cpp's tools) and of
whole requests.

Usage: python benchmarks/speculation.py CKPT [--tasks addition countdown] [--n 50] [--rounds 3]
"""

import argparse
import statistics
import time

from nanoseek.checkpoint import load
from nanoseek.engine import Engine
from nanoseek.evaluate import test_problems
from nanoseek.sampling import SamplingParams
from nanoseek.tasks import get_task


def task_prompts(tokenizer, tasks, n, difficulty):
    prompts = []
    for name in tasks:
        problems = test_problems(get_task(name), n, 0, difficulty or None)
        prompts += [tokenizer.render_chat(p.messages(), add_generation_prompt=True)[0] for p in problems]
    return prompts


def timing_steps(engine):
    """Make engine.step add its seconds to the returned list's one number."""
    spent, step = [0.0], engine.step

    def timed():
        start = time.perf_counter()
        events = step()
        spent[0] += time.perf_counter() - start
        return events

    engine.step = timed
    return spent


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    p.add_argument("--tasks", nargs="+", default=["addition", "countdown"])
    p.add_argument("--difficulty", type=int, default=3)
    p.add_argument("--n", type=int, default=50, help="held-out problems per task")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    model, tokenizer = load(args.ckpt)
    prompts = task_prompts(tokenizer, args.tasks, args.n, args.difficulty)
    greedy = SamplingParams(max_tokens=256, temperature=0)
    ratios = {}
    for batch in (1, 16):
        mine = prompts if batch > 1 else prompts[::5]
        plain = Engine(model, tokenizer, max_batch=batch, speculative=False)
        fast = Engine(model, tokenizer, max_batch=batch, speculative=True)
        for engine in (plain, fast):
            engine.generate(mine[: 2 * batch], greedy)  # compiles the steps for this batch
        fast.speculator.drafted = fast.speculator.accepted = 0
        steps = {"plain": timing_steps(plain), "speculative": timing_steps(fast)}
        times, decode_times, outputs = {"plain": [], "speculative": []}, {"plain": [], "speculative": []}, {}
        for _ in range(args.rounds):
            for name, engine in (("plain", plain), ("speculative", fast)):
                steps[name][0] = 0.0
                start = time.perf_counter()
                outputs[name] = [s.tokens for s in engine.generate(mine, greedy)]
                times[name].append(time.perf_counter() - start)
                decode_times[name].append(steps[name][0])
        same = sum(a == b for a, b in zip(outputs["plain"], outputs["speculative"]))
        n_tokens = sum(len(t) for t in outputs["plain"])
        medians = {k: statistics.median(v) for k, v in times.items()}
        decode = {k: statistics.median(v) for k, v in decode_times.items()}
        print(f"batch {batch:>2}: {len(mine)} prompts, {n_tokens} tokens; decode steps: plain "
              f"{n_tokens / decode['plain']:.0f} tok/s, speculative {n_tokens / decode['speculative']:.0f} tok/s; "
              f"whole requests: plain {n_tokens / medians['plain']:.0f} tok/s, speculative "
              f"{n_tokens / medians['speculative']:.0f} tok/s (medians of {args.rounds}); acceptance "
              f"{100 * fast.acceptance_rate:.1f}%; identical tokens {same} of {len(mine)}", flush=True)
        ratios[batch] = decode["plain"] / decode["speculative"], medians["plain"] / medians["speculative"]
    for batch, (steps_ratio, whole_ratio) in ratios.items():
        print(f"speedup vs plain decoding (batch {batch}, decode steps): {steps_ratio:.2f}")
        print(f"speedup vs plain decoding (batch {batch}, whole requests): {whole_ratio:.2f}")


if __name__ == "__main__":
    main()
