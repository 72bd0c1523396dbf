"""Sort a list of integers ascending; difficulty is the list length."""

import re

from nanoseek.tasks.task import NOT_WELL_FORMED, GeneratedTask, Problem, Reward, parse_completion, phrase

PHRASINGS = {  # {name: template}, drawn at random for every problem
    "sort ascending": "Sort ascending: {numbers}",
    "smallest first": "Put these in order, smallest first: {numbers}",
    "sort": "sort {numbers}",
}


class SortNumbers(GeneratedTask):
    name = "sort"
    difficulties = range(3, 9)

    def make(self, rng, difficulty):
        numbers = [rng.randint(0, 99) for _ in range(difficulty)]
        answer = ", ".join(map(str, sorted(numbers)))
        listed = ", ".join(map(str, numbers))
        question, phrasing = phrase(rng, PHRASINGS, numbers=listed)
        return Problem(question, answer, difficulty, {"numbers": numbers, "key": listed, "phrasing": phrasing})

    def solve(self, problem):
        rest, out, steps = list(problem.data["numbers"]), [], []
        while rest:  # selection sort, said out loud
            m = min(rest)
            rest.remove(m)
            out.append(m)
            steps.append(f"smallest of the rest is {m}: {out}")
        return "\n".join(steps), ", ".join(map(str, out))

    def score(self, problem, completion):
        _, answer, ok = parse_completion(completion)
        if not ok:
            return Reward(0.0, 0.0, NOT_WELL_FORMED)
        if not re.fullmatch(r"\s*-?\d+(\s*,\s*-?\d+)*\s*\.?\s*", answer):
            return Reward(0.0, 0.0, f"answer {answer[:40]!r} is not a comma-separated list of integers")
        got = [int(n) for n in re.findall(r"-?\d+", answer)]
        right = got == sorted(problem.data["numbers"])
        return Reward(float(right), 1.0, "correct" if right else f"got {got}")
