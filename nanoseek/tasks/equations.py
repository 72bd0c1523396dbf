"""Linear equations a*x + b = c with an integer solution; difficulty scales the coefficients."""

from nanoseek.tasks.task import GeneratedTask, Problem, phrase, score_integer

PHRASINGS = {  # {name: template}, drawn at random for every problem
    "solve for": "Solve for x: {equation}",
    "what is x": "What is x if {equation}?",
    "find": "find x: {equation}",
}


class LinearEquation(GeneratedTask):
    name = "linear"
    difficulties = range(1, 4)

    def make(self, rng, difficulty):
        size = 10**difficulty
        x = rng.randint(-size, size)
        a = rng.choice([k for k in range(-9 * difficulty, 9 * difficulty + 1) if k not in (0,)])
        b = rng.randint(-size, size)
        c = a * x + b
        sign = "+" if b >= 0 else "-"
        equation = f"{a}x {sign} {abs(b)} = {c}"
        question, phrasing = phrase(rng, PHRASINGS, equation=equation)
        return Problem(question, str(x), difficulty, {"a": a, "b": b, "c": c, "key": equation, "phrasing": phrasing})

    def solve(self, problem):
        a, b, c = problem.data["a"], problem.data["b"], problem.data["c"]
        x = (c - b) // a
        steps = [f"{a}x + {b} = {c}", f"subtract {b}: {a}x = {c - b}", f"divide by {a}: x = {x}",
                 f"check: {a} * {x} + {b} = {a * x + b}"]
        return "\n".join(steps), str(x)

    def score(self, problem, completion):
        return score_integer(problem, completion)
