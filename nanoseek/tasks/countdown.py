"""Countdown: reach a target from 3-5 numbers, each used at most once, with + - * /.

The worked solution is a search: attempts, one a line, each step a calculator call whose result the engine
writes (the model computes nothing), each attempt checked against the target, until one makes it. Which
attempt comes first and when to stop are the model's choices, and RL sharpens them. Answers are arithmetic
expressions, parsed and computed exactly by calculator.py (the model's own tool): nothing is ever evaluated as
code.
"""

import random
import re
from collections import Counter
from fractions import Fraction

from nanoseek.calculator import evaluate_expression
from nanoseek.tasks.task import NOT_WELL_FORMED, GeneratedTask, Problem, Reward, parse_completion, phrase
from nanoseek.tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END

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


PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def written(left, op, right):
    """a op b with the parentheses precedence needs and no others: items are (value, text, precedence)."""
    (_, ta, pa), (_, tb, pb) = left, right
    ta = f"({ta})" if pa < PRECEDENCE[op] else ta
    tb = f"({tb})" if pb < PRECEDENCE[op] or (pb == PRECEDENCE[op] and op in "-/") else tb
    return f"{ta}{op}{tb}"


def combine(x, y):
    """The ways to combine two (value, text, precedence) items into a whole number: the larger value first for
    - and /, division only when exact and by more than 1."""
    a, b = sorted([x, y], key=lambda item: -item[0])
    ways = [(a[0] + b[0], "+"), (a[0] - b[0], "-"), (a[0] * b[0], "*")]
    if b[0] > 1 and a[0] % b[0] == 0:
        ways.append((a[0] // b[0], "/"))
    return [(value, written(a, op, b), PRECEDENCE[op]) for value, op in ways]


def expressions(numbers):
    """{text: value} of every expression that combines two or more of numbers, each at most once, two at a time
    as combine allows."""
    found = {}

    def walk(items):
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                rest = [items[k] for k in range(len(items)) if k not in (i, j)]
                for item in combine(items[i], items[j]):
                    found.setdefault(item[1], item[0])
                    if rest:
                        walk(rest + [item])

    walk([(n, str(n), 3) for n in numbers])
    return found


MISSES = [0, 0, 1, 1, 2, 3]  # attempts that miss before the one that hits, drawn for every trace
NEAR = 12  # misses are drawn from the attempts this near the target: guesses a search would make


def call(expression, result):
    """A calculator call as a worked solution writes it: the call, then the result the engine writes."""
    return f"{TOOL_CALL_BEGIN}{expression}{TOOL_CALL_END}{TOOL_OUTPUT_BEGIN}{result}{TOOL_OUTPUT_END}"


def attempt_line(expression, value, target):
    """An attempt as the model writes it: one calculator call that takes the attempt from the target, read as
    yes when the calculator says 0: "[calc 80-(14*6-2) = -2] no" (as chat shows calls). The model computes
    nothing: the attempt's value and the comparison are the calculator's."""
    return call(f"{target}-({expression})", target - value) + (" yes" if value == target else " no")


def worked_solution(numbers, target, rng):
    """(trace, answer): a search, one attempt a line, each checked against the target by the calculator, until
    one makes it:

        [calc 80-(14+6*2) = 54] no
        [calc 80-(14*6-2) = -2] no
        [calc 80-(14*6-4) = 0] yes          -> 14*6-4

    (shown as `nanoseek chat` shows tool calls). The misses, 0 to 3 of them, are drawn from the attempts nearest
    the target and tried farthest first, so each attempt comes nearer than the last (in a random order the model
    repeats its likeliest attempt until the budget ends); the hit is drawn at random among the ways that make
    it. Which attempt comes first and when to stop are the model's to learn and RL's to sharpen; no number in it
    is computed by the model."""
    if target in numbers:
        return f"{target} is given", str(target)
    ways = expressions(numbers)
    hits = sorted(text for text, value in ways.items() if value == target)
    if not hits:
        return "...", search(numbers, target)
    near = sorted((text for text, value in ways.items() if value != target),
                  key=lambda text: (abs(ways[text] - target), rng.random()))[:NEAR]
    misses = rng.sample(near, min(rng.choice(MISSES), len(near)))
    misses.sort(key=lambda text: -abs(ways[text] - target))  # each attempt nearer the target than the last
    hit = rng.choice(hits)
    lines = [attempt_line(text, ways[text], target) for text in misses + [hit]]
    return "\n".join(lines), hit


def calculator_calls(reasoning):
    """(expression, result) of every calculator call in a trace that has its result written after it."""
    return re.findall(f"{re.escape(TOOL_CALL_BEGIN)}(.*?){re.escape(TOOL_CALL_END)}{re.escape(TOOL_OUTPUT_BEGIN)}"
                      f"(.*?){re.escape(TOOL_OUTPUT_END)}", reasoning)


def steps_right(reasoning):
    """(steps that compute what they say, steps) in a trace: calculator calls with the results written after
    them, and "a op b=value" steps the model wrote itself, comma- or line-separated."""
    steps = calculator_calls(reasoning)
    plain = re.sub(f"{re.escape(TOOL_CALL_BEGIN)}.*?{re.escape(TOOL_OUTPUT_END)}", "", reasoning)
    steps += [step.partition("=")[::2] for line in plain.split("\n") for step in line.split(",") if "=" in step]
    right = 0
    for expr, value in steps:
        try:
            right += evaluate_expression(expr)[0] == Fraction(value.strip())
        except (ValueError, ZeroDivisionError):
            pass
    return right, len(steps)


def refused_calls(reasoning):
    """Calculator calls in a trace that the calculator refused (its result an "error: ..." string, as for a
    malformed call such as `2)`): steps_right counts them among the steps that are not right."""
    return sum(result.startswith("error:") for _, result in calculator_calls(reasoning))


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

    def strata(self, difficulty):
        """The sizes a held-out eval asks equally often: each of the difficulties given."""
        return list(difficulty) if isinstance(difficulty, (list, tuple)) else [difficulty]

    def check_steps(self, problem, completion):
        """(right, all) steps of the reasoning: each a rule can check on its own."""
        return steps_right(parse_completion(completion)[0])

    def refused_calls(self, completion):
        """How many of the reasoning's calculator calls the calculator refused."""
        return refused_calls(parse_completion(completion)[0])

    def attempts(self, completion):
        """How many attempts the reasoning made: its lines that end in a check's yes or no."""
        return len(re.findall(r" (?:yes|no)$", parse_completion(completion)[0], re.MULTILINE))

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
