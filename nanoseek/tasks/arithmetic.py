"""Multi-digit arithmetic with worked column-by-column reasoning; difficulty is the number of digits."""

from nanoseek.tasks.task import GeneratedTask, Problem, score_integer


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


class Arithmetic(GeneratedTask):
    """a + b, a - b, or a * b with `difficulty` digits (multiplication: the second factor has fewer)."""

    name = "arithmetic"
    difficulties = range(1, 7)
    ops = "+-*"

    def make(self, rng, difficulty):
        op = rng.choice(self.ops)
        lo, hi = 10 ** (difficulty - 1) if difficulty > 1 else 0, 10**difficulty - 1
        a = rng.randint(lo, hi)
        b = rng.randint(lo, hi) if op != "*" else rng.randint(0, 10 ** max(1, difficulty // 2) - 1)
        _, result = OPS[op](a, b)
        return Problem(f"What is {a} {op} {b}?", str(result), difficulty, {"a": a, "b": b, "op": op})

    def solve(self, problem):
        a, b, op = problem.data["a"], problem.data["b"], problem.data["op"]
        lines, result = OPS[op](a, b)
        return "\n".join(lines), str(result)

    def score(self, problem, completion):
        return score_integer(problem, completion)


class Addition(Arithmetic):
    """Multi-digit addition only."""

    name = "addition"
    ops = "+"
