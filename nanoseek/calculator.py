"""The calculator: an arithmetic expression's exact value, for the model's tool calls and Countdown's answers.

An expression is parsed with `ast` into a tree of whole numbers, + - * / and parentheses only, and computed
with exact fractions: nothing is ever evaluated as code. Sizes are bounded before any work (MAX_CHARS
characters, numbers of at most MAX_DIGITS digits, every intermediate value included), so no input is slow or
large. Unary minus is not arithmetic here: "-3" is refused, as Countdown always refused it. Imports nothing of
nanoseek.
"""

import ast
from fractions import Fraction

MAX_CHARS = 200  # longest expression
MAX_DIGITS = 40  # largest number (a numerator or a denominator) anywhere in a computation
OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def calculate(expression: str) -> str:
    """The value of expression as text, never an exception: a whole number as an integer ("12"), any other as
    a reduced fraction ("7/2", "-1/3"), exact; bad input as "error: <why>" ("error: division by zero")."""
    try:
        value, _ = evaluate_expression(expression)
    except ValueError as e:
        return f"error: {e}"
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def evaluate_expression(text):
    """(value, the numbers used) of an expression of whole numbers, + - * / and parentheses; ValueError
    otherwise, whatever the text."""
    if len(text) > MAX_CHARS:
        raise ValueError(f"expression too long (over {MAX_CHARS} characters)")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: a null byte in the text
        raise ValueError("not an arithmetic expression") from None
    used = []

    def walk(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return bounded(Fraction(node.value))
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Add):
                return bounded(left + right)
            if isinstance(node.op, ast.Sub):
                return bounded(left - right)
            if isinstance(node.op, ast.Mult):
                return bounded(left * right)
            if right == 0:
                raise ValueError("division by zero")
            return bounded(left / right)
        what = node.op if isinstance(node, (ast.BinOp, ast.UnaryOp)) else node  # Pow, USub, Name, Call ...
        raise ValueError(f"only numbers and + - * / are allowed, found {type(what).__name__}")

    try:
        return walk(tree), used
    except RecursionError:
        raise ValueError("expression nested too deeply") from None


def bounded(value: Fraction) -> Fraction:
    """value, or ValueError where its numerator or denominator has more than MAX_DIGITS digits."""
    if max(abs(value.numerator), value.denominator) >= 10**MAX_DIGITS:
        raise ValueError(f"number too large (over {MAX_DIGITS} digits)")
    return value
