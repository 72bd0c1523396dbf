"""Countdown: reach a target from 3-5 numbers, each used at most once, with + - * /.

The worked solution tries each number as the last one used: what the other two must make for it, then
those two combined with + - *, until a result is the target or one of the values needed. Answers are
arithmetic expressions, parsed with `ast` into a tree of numbers and the four operators only, and computed
with exact fractions: nothing is ever evaluated as code.
"""

import ast
from collections import Counter
from fractions import Fraction

from nanoseek.tasks.task import NOT_WELL_FORMED, GeneratedTask, Problem, Reward, parse_completion

OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def evaluate_expression(text):
    """(value, numbers used) of an expression of integers, + - * / and parentheses; ValueError otherwise."""
    if len(text) > 200:
        raise ValueError("expression too long")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise ValueError("not an arithmetic expression") from None
    used = []

    def walk(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            if right == 0:
                raise ValueError("division by zero")
            return left / right
        raise ValueError(f"only numbers and + - * / are allowed, found {type(node).__name__}")

    return walk(tree), used


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


def last_steps(target, c):
    """The ways c can be the last number used: (what the other numbers must make, the answer with it as x)."""
    ways = []
    if target > c:
        ways.append((target - c, f"x+{c}"))
    ways.append((target + c, f"x-{c}"))
    if c > target:
        ways.append((c - target, f"{c}-x"))
    if c > 1 and target % c == 0:
        ways.append((target // c, f"x*{c}"))
    return ways


def ones_first(n):
    """A number the trace computes, written from its ones digit up behind a "~" (~52 is 25): each digit then
    depends only on the digits of the operands at that place and on the digit before it."""
    return "~" + str(n)[::-1]


def worked_solution(numbers, target):
    """(trace, answer): for each number c in turn, what the other two must make for c to come last, then
    the other two combined with + - *, until a result is the target or one of those values.

        21: ~73+21, ~97-21        (37 + 21 or 79 - 21 make 58)
        13+24=~73                 -> (13+24)+21
    """
    if target in numbers:
        return f"{target} is given", str(target)
    lines = []
    for k, c in enumerate(numbers):
        a, b = [n for i, n in enumerate(numbers) if i != k][:2]
        ways = last_steps(target, c)
        lines.append(f"{c}: " + ", ".join(form.replace("x", ones_first(v)) for v, form in ways))
        big, small = max(a, b), min(a, b)
        for expr, value in ((f"{a}+{b}", a + b), (f"{big}-{small}", big - small), (f"{a}*{b}", a * b)):
            lines.append(f"{expr}={ones_first(value)}")
            if value == target:
                return "\n".join(lines), expr
            for v, form in ways:
                if value == v:
                    return "\n".join(lines), form.replace("x", f"({expr})")
    return "\n".join(lines + ["..."]), search(numbers, target)


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
                target = int(value)
                q = f"Using the numbers {', '.join(map(str, numbers))}, each at most once, with + - * /, make {target}."
                return Problem(q, str(target), difficulty, {"numbers": numbers, "target": target})

    def solve(self, problem):
        return worked_solution(problem.data["numbers"], problem.data["target"])

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
