"""Problems from a Hugging Face dataset with question and answer columns, as GSM8K has them:
`hf:PATH[:CONFIG]`, e.g. `hf:openai/gsm8k:main`, or a local directory or file in the same layout.

An answer's last line `#### 42` is the final answer and the lines before it the worked reasoning (calculator
notes such as <<48/2=24>> left out); an answer with no `####` is all final answer. Answers are checked with the
math checker (math-verify). The dataset's own test split is the test split; a dataset with no test split is
split by the question's hash, as every task is. The problems are read once, when first needed.
"""

import re

from nanoseek.hub import open_dataset, split_names
from nanoseek.tasks.custom import check
from nanoseek.tasks.task import NOT_WELL_FORMED, Problem, Reward, parse_completion, split_of


class HFTask:
    difficulties = range(1, 2)

    def __init__(self, spec):
        rest = spec.removeprefix("hf:")
        path, sep, config = rest.rpartition(":")
        self.path, self.config = (path, config) if sep and "/" not in config else (rest, "")
        self.name = self.path.rstrip("/").rsplit("/", 1)[-1]
        self.splits = None
        try:
            import math_verify  # noqa: F401
        except ImportError:
            raise ValueError("the math checker of hf: tasks needs math-verify: pip install nanoseek[hf]") from None

    def problems(self, split):
        if self.splits is None:
            self.splits = self._load()
        return self.splits[split]

    def _load(self):
        names = split_names(self.path, self.config)
        splits = {"train": [], "test": []}
        for name in ("train", "test") if "test" in names else names[:1]:
            for i, row in enumerate(open_dataset(self.path, self.config, name)):
                problem = parse_row(row, f"{self.path} ({name}): row {i}")
                splits[name if "test" in names else split_of(problem.question)].append(problem)
        if not splits["train"] or not splits["test"]:
            raise ValueError(f"{self.path} needs problems in both a train and a test split (about 5 or more)")
        return splits

    def sample(self, rng, split, difficulty=None):
        return rng.choice(self.problems(split))

    def solve(self, problem):
        return problem.data["reasoning"] or f"The answer is {problem.answer}.", problem.answer

    def score(self, problem, completion):
        _, answer, ok = parse_completion(completion)
        if not ok:
            return Reward(0.0, 0.0, NOT_WELL_FORMED)
        right = check("math", answer, problem.answer)
        return Reward(float(right), 1.0, "correct" if right else f"answer {answer[:40]!r}, expected {problem.answer}")


def parse_row(row, where):
    """A {question, answer} row as a Problem: GSM8K's answer split into reasoning and the number after ####."""
    question, answer = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not isinstance(answer, str | int | float):
        raise ValueError(f"{where}: expected a text 'question' and an 'answer' column, found {sorted(row)}")
    reasoning, sep, final = str(answer).rpartition("####")
    if not sep:
        reasoning, final = "", str(answer)
    reasoning = re.sub(r"<<[^<>]*>>", "", reasoning).strip()
    return Problem(question, final.strip().replace(",", ""), 1, {"reasoning": reasoning})
