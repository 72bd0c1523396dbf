"""How a chat model holds up as a conversation grows: every smalltalk prompt SFT trains on, and held-out
Countdown and addition problems, each asked after k earlier turns (held-out problems of either task with their
right answers, as a chat client sends a conversation back), greedy. Prints, per k, the smalltalk prompts whose
reply thinks its kind's thought and the tasks' accuracy.

Usage: python benchmarks/turns.py CKPT [CKPT ...] [--turns 0 1 2 3] [--countdown 200] [--addition 100]
"""

import argparse
import random

from nanoseek.checkpoint import load
from nanoseek.engine import Engine
from nanoseek.evaluate import right_answer, test_problems
from nanoseek.sampling import SamplingParams
from nanoseek.tasks import get_task
from nanoseek.tasks.smalltalk import KINDS, reply_kind


def earlier_turns(k, tasks, rng):
    """k held-out problems of the tasks, drawn at random, each with its right answer."""
    messages = []
    for _ in range(k):
        task = rng.choice(tasks)
        problem = task.sample(rng, "test", 3)
        messages += [*problem.messages(), {"role": "assistant", "content": right_answer(task, problem)}]
    return messages


def after(engine, k, conversations, max_tokens, rng, tasks):
    """Greedy replies to each conversation's last question, asked after k earlier turns."""
    render = engine.tokenizer.render_chat
    prompts = [render(earlier_turns(k, tasks, rng) + c, add_generation_prompt=True)[0] for c in conversations]
    return engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", nargs="+")
    parser.add_argument("--turns", type=int, nargs="+", default=[0, 1, 2, 3], help="earlier turns k")
    parser.add_argument("--countdown", type=int, default=200, help="held-out Countdown problems (3 numbers)")
    parser.add_argument("--addition", type=int, default=100, help="held-out additions (3 digits)")
    args = parser.parse_args()
    countdown, addition = get_task("countdown"), get_task("addition")
    problems = [(countdown, p) for p in test_problems(countdown, args.countdown, 0, 3)]
    problems += [(addition, p) for p in test_problems(addition, args.addition, 0, 3)]
    talk = [(kind, prompt) for kind, (prompts, _) in KINDS.items() for prompt in prompts]
    for ckpt in args.ckpt:
        model, tokenizer = load(ckpt)
        engine = Engine(model, tokenizer, max_batch=128)
        print(ckpt)
        for k in args.turns:
            rng = random.Random(k)
            replies = after(engine, k, [[{"role": "user", "content": p}] for _, p in talk], 32, rng,
                            [countdown, addition])
            known = sum(reply_kind(s.text) == kind for (kind, _), s in zip(talk, replies))
            replies = after(engine, k, [p.messages() for _, p in problems], 128, rng, [countdown, addition])
            right = {task.name: 0.0 for task, _ in problems}
            for (task, p), s in zip(problems, replies):
                right[task.name] += task.score(p, s.text).accuracy
            counts = {"countdown": args.countdown, "addition": args.addition}
            scores = "  ".join(f"{name} {100 * r / counts[name]:.1f}%" for name, r in right.items())
            print(f"  after {k} turns: smalltalk recognised {known} of {len(talk)}  {scores}")


if __name__ == "__main__":
    main()
