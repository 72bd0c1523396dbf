"""A user's own problems: a JSONL file of {"question", "answer"} lines and a checker."""

import json
import re

from nanoseek.tasks.task import NOT_WELL_FORMED, Problem, Reward, parse_completion, split_of

CHECKERS = ("exact", "numeric", "math")


class JsonlTask:
    difficulties = range(1, 2)

    def __init__(self, path, checker="exact"):
        if checker not in CHECKERS:
            raise ValueError(f"unknown checker {checker!r}: use one of {CHECKERS}")
        self.name, self.checker = path.rsplit("/", 1)[-1].removesuffix(".jsonl"), checker
        self.splits = {"train": [], "test": []}
        try:
            f = open(path, encoding="utf-8")
        except OSError as e:
            raise ValueError(f"cannot read task file {path}: {e}") from None
        with f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    q, a = row["question"], row["answer"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f'{path}:{lineno}: expected {{"question": ..., "answer": ...}}') from None
                if not isinstance(q, str) or not isinstance(a, str | int | float):
                    raise ValueError(f"{path}:{lineno}: question must be text and answer text or a number")
                p = Problem(q, str(a), 1, {"reasoning": row.get("reasoning")})
                self.splits[split_of(q)].append(p)
        if not self.splits["train"] or not self.splits["test"]:
            raise ValueError(f"{path} needs enough problems for both a train and a test split (about 5 or more)")
        if checker == "math":
            try:
                import math_verify  # noqa: F401
            except ImportError:
                raise ValueError("the math checker needs math-verify: pip install math-verify") from None

    def sample(self, rng, split, difficulty=None):
        return rng.choice(self.splits[split])

    def solve(self, problem):
        reasoning = problem.data.get("reasoning") or f"The answer is {problem.answer}."
        return reasoning, problem.answer

    def score(self, problem, completion):
        _, answer, ok = parse_completion(completion)
        if not ok:
            return Reward(0.0, 0.0, NOT_WELL_FORMED)
        right = check(self.checker, answer, problem.answer)
        return Reward(float(right), 1.0, "correct" if right else f"answer {answer[:40]!r}, expected {problem.answer}")


def check(checker, answer, reference):
    if checker == "exact":
        return _norm(answer) == _norm(reference)
    if checker == "numeric":
        a, b = _number(answer), _number(reference)
        return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))
    from math_verify import parse, verify

    return bool(verify(parse(reference), parse(answer)))


def _norm(s):
    return " ".join(s.strip().rstrip(".").split()).lower()


def _number(s):
    m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?(?:[eE]-?\d+)?)\s*\.?\s*", s.replace(",", ""))
    return float(m.group(1)) if m else None
