"""Tasks: problems whose answers a rule can check.

    class Task(Protocol):
        name: str
        difficulties: range
        def sample(self, rng, split, difficulty=None) -> Problem: ...   # train and test never overlap
        def solve(self, problem) -> tuple[str, str]: ...                # (worked reasoning, final answer)
        def score(self, problem, completion) -> Reward: ...             # accuracy, format, and why

A completion is what the model writes after the prompt, which ends inside <think>: the reasoning,
`</think>`, then the answer. Answers are parsed, never evaluated as code.
"""

import hashlib
import importlib.util
import os
import random
import re
from dataclasses import dataclass, field
from typing import Protocol

from nanoseek.tokenizer import split_thinking

NOT_WELL_FORMED = "no reasoning, then </think>, then an answer"


@dataclass
class Problem:
    question: str
    answer: str  # the reference answer, as text
    difficulty: int = 1
    data: dict = field(default_factory=dict)

    def messages(self):
        return [{"role": "user", "content": self.question}]


@dataclass
class Reward:
    accuracy: float  # 1 if the answer is right
    format: float  # 1 if the completion is <reasoning></think><answer> with a parsable answer
    reason: str


class Task(Protocol):
    name: str
    difficulties: range

    def sample(self, rng: random.Random, split: str, difficulty: int | None = None) -> Problem: ...
    def solve(self, problem: Problem) -> tuple[str, str]: ...
    def score(self, problem: Problem, completion: str) -> Reward: ...


def split_of(question: str, test_every: int = 5) -> str:
    """A fixed split by the question's hash: one problem in test_every is a test problem, on every machine."""
    h = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big")
    return "test" if h % test_every == 0 else "train"


def sample_split(make, rng, split, tries=10_000):
    """Draw problems from make(rng) until one falls in `split`."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    for _ in range(tries):
        p = make(rng)
        if split_of(p.question) == split:
            return p
    raise RuntimeError("could not draw a problem of this split; the task has too few distinct problems")


def pick_difficulty(rng, difficulty, choices):
    """difficulty: one level, a list of levels to draw from, or None for the task's whole range."""
    if isinstance(difficulty, int) and difficulty:
        return difficulty
    return rng.choice(list(difficulty or choices))


class GeneratedTask:
    """Base of tasks that make problems from a seed: subclasses define make(rng, difficulty)."""

    difficulties = range(1, 2)

    def sample(self, rng, split, difficulty=None):
        return sample_split(lambda r: self.make(r, pick_difficulty(r, difficulty, self.difficulties)), rng, split)


def parse_completion(completion: str):
    """(reasoning, answer, well_formed), split as the API splits it (at the first </think>); well formed means
    reasoning, then </think>, then an answer."""
    reasoning, answer = split_thinking(completion)
    answer = answer.strip()
    return reasoning, answer, bool(reasoning.strip()) and bool(answer)


def parse_int(text: str):
    """The answer as an integer when it is one (commas and a trailing period allowed), else None."""
    t = text.strip().rstrip(".").replace(",", "").strip()
    return int(t) if re.fullmatch(r"-?\d+", t) else None


def score_integer(problem: Problem, completion: str) -> Reward:
    _, answer, ok = parse_completion(completion)
    if not ok:
        return Reward(0.0, 0.0, NOT_WELL_FORMED)
    value = parse_int(answer)
    if value is None:
        return Reward(0.0, 0.0, f"answer {answer[:40]!r} is not an integer")
    right = value == int(problem.answer)
    return Reward(float(right), 1.0, "correct" if right else f"answer {value}, expected {problem.answer}")


def as_chat(problem: Problem, reasoning: str, answer: str):
    return problem.messages() + [{"role": "assistant", "content": answer, "reasoning_content": reasoning}]


def task_documents(spec, n, kind="chat", seed=0, difficulty=None, checker="exact"):
    """n training problems of a task, worked by solve, as ("chat", messages with the reasoning) or ("text", str)
    documents for `nanoseek data`."""
    if kind not in ("chat", "text"):
        raise ValueError(f"kind must be 'chat' or 'text', not {kind!r}")
    task, rng = get_task(spec, checker), random.Random(seed)
    for _ in range(n):
        problem = task.sample(rng, "train", difficulty)
        reasoning, answer = task.solve(problem)
        if kind == "chat":
            yield "chat", as_chat(problem, reasoning, answer)
        else:
            yield "text", f"{problem.question}\n{reasoning}\nAnswer: {answer}"


# ----------------------------------------------------------------------------- finding tasks


def builtin_tasks():
    from nanoseek.tasks.arithmetic import Addition, Arithmetic
    from nanoseek.tasks.countdown import Countdown
    from nanoseek.tasks.equations import LinearEquation
    from nanoseek.tasks.sorting import SortNumbers

    return {t.name: t for t in (Addition(), Arithmetic(), Countdown(), LinearEquation(), SortNumbers())}


def get_task(spec: str, checker: str = "exact"):
    """A built-in task by name, a JSONL file of question/answer pairs, or path/to/file.py:ClassName."""
    tasks = builtin_tasks()
    if spec in tasks:
        return tasks[spec]
    if spec.endswith(".jsonl"):
        from nanoseek.tasks.custom import JsonlTask

        return JsonlTask(spec, checker)
    if ".py:" in spec:
        path, _, cls = spec.rpartition(":")
        if not os.path.isfile(path):
            raise ValueError(f"task file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"nanoseek_user_task_{abs(hash(path))}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)  # the user's own code, named on the command line
        if not hasattr(module, cls):
            raise ValueError(f"{path} has no class {cls}")
        task = getattr(module, cls)()
        missing = [m for m in ("name", "sample", "solve", "score") if not hasattr(task, m)]
        if missing:
            raise ValueError(f"{spec} is not a task: it lacks {missing}")
        if not hasattr(task, "difficulties"):
            task.difficulties = range(1, 2)
        return task
    raise ValueError(f"unknown task {spec!r}: use one of {sorted(tasks)}, a .jsonl file or file.py:ClassName")
