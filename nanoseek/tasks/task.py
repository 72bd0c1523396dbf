"""What a task is: a Problem, its Reward, the Task protocol, the fixed train/test split, and the parsing
and scoring every built-in task shares. A completion is what the model writes after the prompt, which ends
inside <think>: the reasoning, `</think>`, then the answer. Answers are parsed, never evaluated as code."""

import hashlib
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

    @property
    def key(self):
        """What the train/test split hashes: the problem itself (data["key"]), whatever its phrasing."""
        return self.data.get("key", self.question)


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
        if split_of(p.key) == split:
            return p
    raise RuntimeError("could not draw a problem of this split; the task has too few distinct problems")


def phrase(rng, phrasings, **fields):
    """(question, phrasing name): the problem in one of the task's phrasings ({name: template}), drawn at random,
    so the model meets the ways people ask in pretraining, SFT, RL and eval alike."""
    name = rng.choice(list(phrasings))
    return phrasings[name].format(**fields), name


def pick_difficulty(rng, difficulty, choices):
    """difficulty: one level (an int, or a tuple for a task whose level has parts, as addition's pair of operand
    lengths), a list of levels to draw from, or None for the task's whole range."""
    if isinstance(difficulty, (int, tuple)) and difficulty:
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
