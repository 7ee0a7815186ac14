"""Answer extraction and scoring on fixed examples: GSM8K-style, MATH-style and code."""
from __future__ import annotations

import math

import pytest

from dllmq.evaluate import metrics as M
from dllmq.evaluate.humaneval import humaneval_problems
from dllmq.evaluate.sandbox import run_program

GSM8K_REFERENCE = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                   "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


@pytest.mark.parametrize("text,expected", [
    ("$1,234.50.", "1234.5"), ("-3.0", "-3"), ("5.", "5"), ("0.250", "0.25"), (" 42 ", "42"), ("abc", None),
    ("", None), (None, None),
])
def test_normalize_number(text, expected):
    assert M.normalize_number(text) == expected


def test_gsm8k_reference_and_extraction():
    assert M.gsm8k_reference(GSM8K_REFERENCE) == "72"
    assert M.gsm8k_reference("1,000") == "1000"
    assert M.extract_gsm8k_answer("48 + 24 = 72 clips.\n#### 72") == "72"
    assert M.extract_gsm8k_answer("So the total is $1,080.\n\nQuestion: next one 5") == "5"  # last number
    assert M.extract_gsm8k_answer("She pays 3 * 4 = 12 dollars. The answer is 12.") == "12"
    assert M.extract_gsm8k_answer("#### -7") == "-7"
    assert M.extract_gsm8k_answer("no numbers here") is None
    assert M.extract_gsm8k_answer("she sold 72 clips", strict=True) is None


@pytest.mark.parametrize("completion,correct", [
    ("She sold 24 in May, 48 + 24 = 72 in total.\n#### 72", True),
    ("The answer is 72.", True),
    ("Altogether she sold 72.0 clips.", True),
    ("#### 71", False),
    ("I am not sure.", False),
    ("#### 72 wait no #### 70", True),   # strict takes the first '####'
])
def test_gsm8k_correct(completion, correct):
    assert M.gsm8k_correct(completion, GSM8K_REFERENCE) is correct


def test_gsm8k_strict_needs_the_marker():
    assert M.gsm8k_correct("so 72", GSM8K_REFERENCE) and not M.gsm8k_correct("so 72", GSM8K_REFERENCE, strict=True)


def test_boxed_extraction():
    assert M.last_boxed_only_string(r"so $\boxed{\frac{1}{2}}$.") == r"\boxed{\frac{1}{2}}"
    assert M.last_boxed_only_string(r"\boxed{1} then \boxed{\sqrt{2}^{3}}") == r"\boxed{\sqrt{2}^{3}}"
    assert M.last_boxed_only_string(r"\fbox{5}") == r"\fbox{5}"
    assert M.last_boxed_only_string(r"$\boxed 5$") == r"\boxed 5"
    assert M.last_boxed_only_string(r"\boxed{unclosed") is None
    assert M.last_boxed_only_string("nothing") is None
    assert M.remove_boxed(r"\boxed{\{1,2\}}") == r"\{1,2\}"
    assert M.remove_boxed(r"\boxed 5") == "5"


@pytest.mark.parametrize("a,b", [
    (r"\dfrac12", r"\frac{1}{2}"), ("0.5", r"\frac{1}{2}"), ("1/2", r"\frac{1}{2}"), ("x = 5", "5"),
    (r"\left( 3, 4 \right)", "(3,4)"), (r"90^\circ", "90"), (r"\$5", "5"), (r"10\%", "10"),
    (r"5\text{ cm}", "5"), (r"\sqrt3", r"\sqrt{3}"), (r"\tfrac{3}{4}", r"\frac34"), ("2.50", "2.5"),
])
def test_math_equivalences(a, b):
    assert M.math_equal(a, b)


@pytest.mark.parametrize("a,b", [("3", "4"), (r"\frac{1}{2}", r"\frac{1}{3}"), ("(1,2)", "(2,1)"), ("x", "y")])
def test_math_differences(a, b):
    assert not M.math_equal(a, b)


def test_math_answers_from_completions():
    solution = r"We have $x^2 = \frac{9}{16}$, so $x = \boxed{\frac34}$."
    assert M.extract_math_answer(solution) == r"\frac34"
    minerva = "Squaring... Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct."
    assert M.extract_math_answer(minerva) == r"$\frac{3}{4}$"
    assert M.math_correct(minerva, solution)
    assert M.math_correct(r"Thus \boxed{0.75}", solution)
    assert M.math_correct("The answer is 3/4.", solution)
    assert not M.math_correct(r"Thus \boxed{\frac{4}{3}}", solution)
    assert not M.math_correct("I give up", solution)
    assert M.normalize_final_answer(r"\text{(B)}") == "(B)"
    assert M.normalize_final_answer("5 dollars") == "5"


def test_truncate_and_extract_code():
    body = "    return sorted(x)\n\ndef helper():\n    pass\n"
    assert M.truncate_at_stops(body, M.HUMANEVAL_STOP) == "    return sorted(x)\n"
    assert M.truncate_at_stops("a\nprint(1)\n#x", M.HUMANEVAL_STOP) == "a"
    assert M.truncate_at_stops("no stops", M.HUMANEVAL_STOP) == "no stops"
    fenced = "Here you go:\n```python\ndef f():\n    return 1\n```\nThat's it."
    assert M.extract_code(fenced) == "def f():\n    return 1\n"
    assert M.extract_code("```\nx = 1\n```") == "x = 1\n"
    assert M.extract_code("[BEGIN]\ndef g():\n  return 2\n[DONE]\nmore text") == "\ndef g():\n  return 2\n"
    assert M.extract_code("plain = 3") == "plain = 3"


def test_humaneval_programs_run_in_the_sandbox():
    problem = humaneval_problems()[0]
    args = (problem["test"], problem["entry_point"])
    canonical = M.humaneval_program(problem["prompt"], problem["canonical_solution"], *args)
    assert canonical.startswith(problem["prompt"]) and canonical.rstrip().endswith(f"check({problem['entry_point']})")
    assert run_program(canonical, allow_code_execution=True).passed
    # an instruct-style answer: the whole function in a fence, without the prompt's imports
    whole = ("Sure!\n```python\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
             "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n```")
    program = M.humaneval_program(problem["prompt"], whole, *args)
    assert program.startswith("from typing import List\n")
    assert run_program(program, allow_code_execution=True).passed
    wrong = M.humaneval_program(problem["prompt"], "    return False\n", *args)
    assert not run_program(wrong, allow_code_execution=True).passed


def test_mbpp_program_runs_in_the_sandbox():
    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
    good = M.mbpp_program("[BEGIN]\ndef add(a, b):\n    return a + b\n[DONE]", tests)
    assert good.rstrip().endswith(tests[-1])
    assert run_program(good, allow_code_execution=True).passed
    bad = M.mbpp_program("def add(a, b):\n    return a - b\n", tests)
    assert not run_program(bad, allow_code_execution=True).passed


def test_pass_at_k():
    assert M.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert M.pass_at_k(10, 0, 5) == 0.0
    assert M.pass_at_k(5, 3, 3) == 1.0  # fewer failures than k: some pick always passes
    assert M.pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))
    with pytest.raises(ValueError):
        M.pass_at_k(3, 4, 1)
