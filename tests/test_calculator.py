"""The calculator: exact values of arithmetic, and an error string (never an exception) for anything else."""

import time

import pytest

from nanoseek.calculator import MAX_DIGITS, calculate, evaluate_expression


@pytest.mark.parametrize("expression, result", [
    ("3*4", "12"), ("7/2", "7/2"), ("6/4", "3/2"), ("8/4", "2"), ("1-5", "-4"), ("1/3-1", "-2/3"),
    (" (14 - 6) * (2 + 1) ", "24"), ("10/(5-3)", "5"), ("1/3+1/3+1/3", "1"), ("((((2))))", "2"), ("0", "0"),
    ("12345678901234567890*98765432109876543210", str(12345678901234567890 * 98765432109876543210)),
])
def test_exact_values(expression, result):
    assert calculate(expression) == result


@pytest.mark.parametrize("expression, why", [
    ("1/0", "division by zero"), ("5/(3-3)", "division by zero"),
    ("9" * 500, "expression too long"), ("1+" * 150 + "1", "expression too long"),
    ("9" * 41, "number too large"), ("9" * 20 + "*" + "9" * 21, "number too large"),
    ("1/" + "7" * 41, "number too large"),
    ("(" * 90 + "1" + ")" * 90, None),  # nested, but within the size limits: computed
    ("-3", "only numbers and + - * / are allowed, found USub"),
    ("2**10", "found Pow"), ("7//2", "found FloorDiv"), ("7%2", "found Mod"), ("1.5+1", "found Constant"),
    ("True+1", "found Constant"), ("__import__('os').system('echo pwned')", "found Call"), ("x+1", "found Name"),
    ("", "not an arithmetic expression"), ("3 4", "not an arithmetic expression"),
    ("1+\x002", "not an arithmetic expression"), ("lambda: 1", "found Lambda"), ("[1, 2]", "found List"),
    ("<｜tool▁call▁end｜>", "not an arithmetic expression"),
])
def test_bad_input_is_an_error_string(expression, why):
    result = calculate(expression)
    if why is None:
        assert result == "1"
    else:
        assert result.startswith("error: ") and why in result, result


def test_nothing_raises_or_takes_long():
    """Deep nesting (RecursionError in a parser without the size limit), big products, long texts: each answers
    at once with a value or an error."""
    hostile = ["(" * 5000 + "1" + ")" * 5000, "1" + "*99" * 60, "9" * 39 + "*" + "9" * 39 + "*" + "9" * 39,
               "((" * 100, "1/" * 99 + "1", "\udcff", "１２+３", "0" * 199 + "1"]
    for text in hostile:
        start = time.perf_counter()
        result = calculate(text)
        assert isinstance(result, str) and time.perf_counter() - start < 0.5, text[:40]
    with pytest.raises(ValueError):
        evaluate_expression("9" * (MAX_DIGITS + 1))


def test_numbers_used_are_reported_for_countdown():
    value, used = evaluate_expression("(25 - 5) * 4 / 2")
    assert value == 40 and used == [25, 5, 4, 2]
