"""Countdown: reach a target from 3-5 numbers, each used at most once, with + - * /.

The worked solution is a depth-first search trace: which pairs it combines, dead ends, and the path that
reaches the target. Answers are arithmetic expressions, parsed with `ast` into a tree of numbers and the
four operators only, and computed with exact fractions: nothing is ever evaluated as code.
"""

import ast
from collections import Counter
from fractions import Fraction

from nanoseek.tasks import GeneratedTask, Problem, Reward, parse_completion

TRIES_WRITTEN = 20  # combinations a worked solution writes down before it jumps to the answer
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


def search(numbers, target, trace, limit=200):
    """Depth-first search over pairs; returns an expression reaching target or None.

    Appends one line per combination tried to trace, "a+b=v" on the values, indented by depth: a line that
    comes back to a shallower indent has given up on the branch above it."""
    items = [(Fraction(n), str(n)) for n in numbers]
    budget = [limit]

    def dfs(items, depth):
        for v, e in items:
            if v == target:
                return e
        if len(items) == 1 or budget[0] <= 0:
            return None
        for i in range(len(items)):
            for j in range(len(items)):
                if i == j:
                    continue
                (a, ea), (b, eb) = items[i], items[j]
                rest = [items[k] for k in range(len(items)) if k not in (i, j)]
                for op in "+-*/":
                    if op in "+*" and i > j:
                        continue  # commutative: try each pair once
                    if op == "/" and (b == 0 or (a / b).denominator != 1):
                        continue  # whole-number steps only
                    if op == "-" and a < b:
                        continue
                    v = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b
                    budget[0] -= 1
                    if budget[0] <= 0:
                        return None
                    trace.append(" " * depth + f"{a}{op}{b}={v}")
                    found = dfs(rest + [(v, f"({ea}{op}{eb})")], depth + 1)
                    if found:
                        return found
        return None

    found = dfs(items, 0)
    return found[1:-1] if found and found.startswith("(") and found.endswith(")") else found


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
        numbers, target = problem.data["numbers"], problem.data["target"]
        trace = []
        expr = search(numbers, target, trace, limit=TRIES_WRITTEN)
        if expr is None:  # the trace got long: search again without writing it down
            expr = search(numbers, target, [], limit=100_000)
            trace.append("...")
        return "\n".join(trace), expr

    def score(self, problem, completion):
        _, answer, ok = parse_completion(completion)
        if not ok:
            return Reward(0.0, 0.0, "no single </think> followed by an answer")
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
