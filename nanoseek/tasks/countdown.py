"""Countdown: reach a target from 3-5 numbers, each used at most once, with + - * /.

The worked solution is the steps of one way to the target, each combining two values at a time
("14-6=8,8+2=10"), the way drawn at random among those a search finds: which way to take is the model's
choice, and RL sharpens it towards the ways it computes right. Answers are arithmetic expressions, parsed
and computed exactly by calculator.py (the model's own tool): nothing is ever evaluated as code.
"""

import random
from collections import Counter
from fractions import Fraction

from nanoseek.calculator import evaluate_expression
from nanoseek.tasks.task import NOT_WELL_FORMED, GeneratedTask, Problem, Reward, parse_completion, phrase

PHRASINGS = {  # {name: template}, drawn at random for every problem
    "using": "Using the numbers {numbers}, each at most once, with + - * /, make {target}.",
    "make": "make {target} from {numbers} using + - * /",
    "reach": "Reach {target} with {numbers}.",
    "arrow": "countdown: {numbers} -> {target}",
}


def search(numbers, target, limit=100_000):
    """Depth-first search over pairs and all four operators; an expression reaching target, or None."""
    items = [(Fraction(n), str(n)) for n in numbers]
    budget = [limit]

    def dfs(items):
        for v, e in items:
            if v == target:
                return e
        if len(items) == 1 or budget[0] <= 0:
            return None
        for i in range(len(items)):
            for j in range(len(items)):
                (a, ea), (b, eb) = items[i], items[j]
                if i == j or (b == 0 and i > j):
                    continue
                rest = [items[k] for k in range(len(items)) if k not in (i, j)]
                for op in "+-*/":
                    if (op in "+*" and i > j) or (op == "/" and b == 0):
                        continue
                    budget[0] -= 1
                    v = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b
                    found = dfs(rest + [(v, f"({ea}{op}{eb})")])
                    if found:
                        return found
        return None

    found = dfs(items)
    return found[1:-1] if found and found.startswith("(") and found.endswith(")") else found


def combine(x, y):
    """The ways to combine two (value, expression) items into a whole number, as (step, value, expression):
    the larger value first for - and /, division only when exact and by more than 1."""
    (a, ea), (b, eb) = sorted([x, y], key=lambda item: -item[0])
    ways = [(f"{a}+{b}", a + b, f"({ea}+{eb})"), (f"{a}-{b}", a - b, f"({ea}-{eb})"),
            (f"{a}*{b}", a * b, f"({ea}*{eb})")]
    if b > 1 and a % b == 0:
        ways.append((f"{a}/{b}", a // b, f"({ea}/{eb})"))
    return ways


def reaching(numbers, target, rng):
    """Steps that make target, found by a search that tries pairs and operations in a random order; None when
    no way exists."""

    def walk(items, steps):
        pairs = [(i, j) for i in range(len(items)) for j in range(i + 1, len(items))]
        for i, j in rng.sample(pairs, len(pairs)):
            rest = [items[k] for k in range(len(items)) if k not in (i, j)]
            ways = combine(items[i], items[j])
            for step in rng.sample(ways, len(ways)):
                if step[1] == target:
                    return steps + [step]
                found = len(rest) and walk(rest + [step[1:]], steps + [step])
                if found:
                    return found
        return None

    return walk([(n, str(n)) for n in numbers], [])


def worked_solution(numbers, target, rng):
    """(trace, answer): the steps of one way to make the target, each combining two values, on one line:

        14-6=8,8+2=10             -> (14-6)+2

    The way is drawn at random (a search over pairs and operations in a random order), so which one to take
    is a choice the model learns and RL can sharpen; every step computes what it says. Traces of attempts that
    miss before the one that hits measured worse (docs/SPEEDRUN.md): the small model could not tell reliably
    whether the line it had written made the target, so it stopped on misses and went on past hits."""
    if target in numbers:
        return f"{target} is given", str(target)
    hit = reaching(numbers, target, rng)
    if hit is None:
        return "...", search(numbers, target)
    return ",".join(f"{step}={value}" for step, value, _ in hit), hit[-1][2][1:-1]


def steps_right(reasoning):
    """(steps that compute what they say, steps) in a trace of "a op b=value" steps, comma- or line-separated."""
    steps = [step for line in reasoning.split("\n") for step in line.split(",") if "=" in step]
    right = 0
    for step in steps:
        expr, _, value = step.partition("=")
        try:
            right += evaluate_expression(expr)[0] == int(value)
        except (ValueError, RecursionError):
            pass
    return right, len(steps)


class Countdown(GeneratedTask):
    name = "countdown"
    difficulties = range(3, 6)  # how many numbers

    def make(self, rng, difficulty):
        while True:
            numbers = [rng.randint(1, 25) for _ in range(difficulty)]
            # a target reachable by construction: combine a random subset with random operators
            picked = rng.sample(numbers, rng.randint(2, difficulty))
            value = Fraction(picked[0])
            for n in picked[1:]:
                op = rng.choice("+-*")
                value = value + n if op == "+" else abs(value - n) if op == "-" else value * n
            if value.denominator == 1 and 10 <= value <= 200:
                target, listed = int(value), ", ".join(map(str, numbers))
                question, phrasing = phrase(rng, PHRASINGS, numbers=listed, target=target)
                data = {"numbers": numbers, "target": target, "key": f"{listed} -> {target}", "phrasing": phrasing}
                return Problem(question, str(target), difficulty, data)

    def solve(self, problem):
        rng = random.Random(problem.key)  # one worked solution per problem, chosen at random among all
        return worked_solution(problem.data["numbers"], problem.data["target"], rng)

    def check_steps(self, problem, completion):
        """(right, all) steps of the reasoning: each a rule can check on its own."""
        return steps_right(parse_completion(completion)[0])

    def score(self, problem, completion):
        _, answer, ok = parse_completion(completion)
        if not ok:
            return Reward(0.0, 0.0, NOT_WELL_FORMED)
        answer = answer.split("=")[0].strip()
        try:
            value, used = evaluate_expression(answer)
        except (ValueError, RecursionError) as e:
            return Reward(0.0, 0.0, f"answer {answer[:40]!r} is not usable: {e}")
        if Counter(used) - Counter(problem.data["numbers"]):
            return Reward(0.0, 1.0, f"uses numbers not given (or too often): {used}")
        if value != problem.data["target"]:
            return Reward(0.0, 1.0, f"{answer} = {value}, not {problem.data['target']}")
        return Reward(1.0, 1.0, "correct")
