"""Multi-digit arithmetic with worked column-by-column reasoning, asked the ways people ask.

Arithmetic's difficulty is the number of digits. Addition's is the most digits an operand has: each operand's
length is drawn on its own from 1 to it (1 + 4 digits as often as 4 + 4), 0 and single digits included.
"""

from nanoseek.tasks.task import GeneratedTask, Problem, phrase, score_integer

WORDS = {"+": "plus", "-": "minus", "*": "times"}
PHRASINGS = {  # {name: template}, drawn at random for every problem
    "what is": "What is {a} {op} {b}?",
    "bare": "{a}{op}{b}",
    "equals": "{a} {op} {b} = ?",
    "what's": "what's {a} {word} {b}?",
    "compute": "Compute {a} {op} {b}.",
}
ADDITION_PHRASINGS = {**PHRASINGS, "add": "add {a} and {b}", "sum": "Find the sum of {a} and {b}."}


def _digits(n):
    return [int(c) for c in str(n)][::-1]


def _spaced(digits):
    return " ".join(map(str, digits))


def add_steps(a, b):
    """Column addition from the right, one line a column: "x+y+carry=two-digit sum" and the answer's digits
    so far. Each line copies the previous line's digits behind its new one; a last carry gets a column of
    its own (0+0+1), so the last line's digits are the answer: no step looks further back than one line."""
    da, db = _digits(a), _digits(b)
    carry, written, lines = 0, "", []
    for i in range(max(len(da), len(db)) + 1):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        if i >= max(len(da), len(db)) and not carry:
            break
        s = x + y + carry
        written = str(s % 10) + written
        lines.append(f"{x}+{y}+{carry}={s:02d} {written}")
        carry = s // 10
    return lines, a + b


def sub_steps(a, b):
    """a - b by columns with borrows; for a < b compute b - a and negate."""
    if a < b:
        lines, r = sub_steps(b, a)
        return [f"{a} < {b}, so compute {b} - {a} and negate"] + lines, -r
    da, db = _digits(a), _digits(b)
    borrow, out, lines = 0, [], [f"digits from the right: {_spaced(da)} and {_spaced(db)}"]
    for i in range(len(da)):
        x, y = da[i] - borrow, (db[i] if i < len(db) else 0)
        borrow = int(x < y)
        d = x + 10 * borrow - y
        lines.append(f"{x + 10 * borrow} - {y} = {d}" + (", borrow 1" if borrow else ""))
        out.append(d)
    lines.append(f"written from the right: {_spaced(out)}")
    return lines, int("".join(map(str, out[::-1])))


def mul_steps(a, b):
    """Long multiplication: a times each digit of b, shifted, then summed."""
    lines, total = [], 0
    for i, d in enumerate(_digits(b)):
        part = a * d * 10**i
        lines.append(f"{a} * {d * 10**i} = {part}")
        total += part
    lines.append(f"sum of the parts = {total}")
    return lines, total


OPS = {"+": add_steps, "-": sub_steps, "*": mul_steps}


def number_of_length(rng, digits):
    """A whole number of exactly `digits` digits (one digit: 0 to 9)."""
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def problem(a, op, b, difficulty, rng, phrasings=PHRASINGS):
    """a op b as a Problem in a phrasing drawn at random; the split hashes "a op b", whatever the phrasing."""
    question, phrasing = phrase(rng, phrasings, a=a, b=b, op=op, word=WORDS[op])
    _, result = OPS[op](a, b)
    data = {"a": a, "b": b, "op": op, "key": f"{a} {op} {b}", "phrasing": phrasing}
    return Problem(question, str(result), difficulty, data)


class Arithmetic(GeneratedTask):
    """a + b, a - b, or a * b with `difficulty` digits (multiplication: the second factor has fewer)."""

    name = "arithmetic"
    difficulties = range(1, 7)
    ops = "+-*"

    def make(self, rng, difficulty):
        op = rng.choice(self.ops)
        a = number_of_length(rng, difficulty)
        b = number_of_length(rng, difficulty) if op != "*" else rng.randint(0, 10 ** max(1, difficulty // 2) - 1)
        return problem(a, op, b, difficulty, rng)

    def solve(self, problem):
        a, b, op = problem.data["a"], problem.data["b"], problem.data["op"]
        lines, result = OPS[op](a, b)
        return "\n".join(lines), str(result)

    def score(self, problem, completion):
        return score_integer(problem, completion)


class Addition(Arithmetic):
    """a + b, each operand's length drawn on its own from 1 to `difficulty` digits. A difficulty may also be a
    (digits of a, digits of b) pair: the held-out eval asks every pair (strata)."""

    name = "addition"
    difficulties = range(1, 7)

    def make(self, rng, difficulty):
        lengths = difficulty if isinstance(difficulty, tuple) else [rng.randint(1, difficulty) for _ in range(2)]
        a, b = (number_of_length(rng, n) for n in lengths)
        p = problem(a, "+", b, max(lengths) if isinstance(difficulty, tuple) else difficulty, rng,
                    ADDITION_PHRASINGS)
        p.data["lengths"] = f"{lengths[0]}+{lengths[1]}"
        return p

    def strata(self, difficulty):
        """The (digits of a, digits of b) pairs a held-out eval asks equally often: every pair up to the most
        digits of the difficulty (or difficulties) given."""
        most = max(difficulty) if isinstance(difficulty, (list, tuple)) else difficulty or max(self.difficulties)
        return [(x, y) for x in range(1, most + 1) for y in range(1, most + 1)]
