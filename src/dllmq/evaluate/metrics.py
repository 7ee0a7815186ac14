"""Answer extraction and scoring: GSM8K-style numbers, MATH-style boxed / final answers, code.

Pure functions on strings (no model, no harness), so they are easy to test on fixed examples and
shared by the lm-eval tasks, the mini tasks and the study's reports.

GSM8K: the reference answer follows "####"; a completion's answer is the number after "####"
(strict) or, failing that, the last number in the text (flexible), compared numerically after
removing "$", thousands separators and a trailing period.

MATH: the reference answer is the last \\boxed{...} of the solution; a completion's answer is its
last \\boxed{...}, else the Minerva form "Final Answer: The final answer is X. I hope it is
correct.", else "The answer is X". Both sides are normalised the way the Hendrycks MATH and
Minerva evaluations do (fractions, \\left/\\right, units, degrees, spaces, trailing zeros) and
compared as strings, then numerically when both are numbers.

Code: completions are cut at stop sequences, fenced ``` blocks are unwrapped, and the program
that the sandbox runs is assembled: HumanEval's prompt + completion + tests + check(entry_point),
or MBPP's code + its asserts.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from fractions import Fraction

# ----------------------------------------------------------------------------- numbers / GSM8K
_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_STRICT = re.compile(r"####\s*(-?\$?\s?[\d.,]*\d)")
_ANSWER_IS = re.compile(r"answer is[:\s]*\$?\s*(-?[\d.,]*\d)", re.IGNORECASE)


def normalize_number(text: str | None) -> str | None:
    """'$1,234.50.' -> '1234.5'; '-3.0' -> '-3'; None when `text` is not a number."""
    if text is None:
        return None
    s = text.strip().replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    if not s:
        return None
    try:
        value = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    if value.denominator == 1:
        return str(value.numerator)
    return repr(float(value)).rstrip("0").rstrip(".")


def gsm8k_reference(answer: str) -> str | None:
    """The gold number of a GSM8K answer field (the text after '####')."""
    if "####" in answer:
        answer = answer.split("####")[-1]
    return normalize_number(answer)


def extract_gsm8k_answer(text: str, strict: bool = False) -> str | None:
    """The number a completion answers with: after '####' (strict), else after 'The answer is',
    else the last number in the text. Normalised with normalize_number; None when there is none."""
    m = _STRICT.search(text)
    if m:
        return normalize_number(m.group(1))
    if strict:
        return None
    hits = _ANSWER_IS.findall(text)
    if hits:
        return normalize_number(hits[-1])
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def numbers_equal(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return Fraction(a) == Fraction(b)
    except (ValueError, ZeroDivisionError):
        return a == b


def gsm8k_correct(completion: str, reference: str, strict: bool = False) -> bool:
    """Whether a completion's answer equals the reference (a GSM8K answer field or a bare number)."""
    return numbers_equal(extract_gsm8k_answer(completion, strict=strict), gsm8k_reference(reference))


# ----------------------------------------------------------------------------- MATH
def last_boxed_only_string(text: str) -> str | None:
    """The last '\\boxed{...}' (or '\\fbox{...}', or '\\boxed X') of `text`, braces balanced."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    rest = text[idx:]
    if rest.startswith("\\boxed "):
        return "\\boxed " + rest[len("\\boxed "):].split("$")[0].strip()
    depth, start = 0, None
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
            start = i if start is None else start
        elif ch == "}":
            depth -= 1
            if depth == 0 and start is not None:
                return rest[: i + 1]
    return None


def remove_boxed(boxed: str | None) -> str | None:
    """'\\boxed{x}' -> 'x' (also '\\fbox{x}' and '\\boxed x')."""
    if boxed is None:
        return None
    for prefix in ("\\boxed ",):
        if boxed.startswith(prefix):
            return boxed[len(prefix):]
    for prefix in ("\\boxed{", "\\fbox{"):
        if boxed.startswith(prefix) and boxed.endswith("}"):
            return boxed[len(prefix):-1]
    return None


def _fix_fracs(s: str) -> str:
    """'\\frac12' -> '\\frac{1}{2}', '\\frac1{72}' -> '\\frac{1}{72}'."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            out += part
            continue
        a, b, rest = part[0], part[1], part[2:]
        if b == "{":
            out += "{" + a + "}" + b + rest
        else:
            out += "{" + a + "}{" + b + "}" + rest
    return out


def _fix_a_slash_b(s: str) -> str:
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def _fix_sqrt(s: str) -> str:
    """'\\sqrt3' -> '\\sqrt{3}'."""
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def _remove_right_units(s: str) -> str:
    if "\\text{ " in s:
        return s.split("\\text{ ")[0]
    return s


def strip_math_answer(s: str) -> str:
    """Normalise a MATH answer string (the Hendrycks MATH equivalence rules)."""
    s = s.replace("\n", "").replace("\\!", "")
    s = s.replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    s = _remove_right_units(s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    # "x = 5" -> "5" when the left side is short (a variable name)
    if s.count("=") == 1 and len(s.split("=")[0].strip()) <= 2:
        s = s.split("=")[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    s = _fix_a_slash_b(s)
    return s


_MINERVA_FINAL = re.compile(r"Final Answer: The final answer is(.*?)\. I hope it is correct\.", re.DOTALL)
_SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""), ("mbox", "text"),
                  (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]
_REMOVED = ["square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots", "sue",
            "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
            "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
            "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;",
            r",\!", "{,}", '"', "\\dots"]


def normalize_final_answer(answer: str) -> str:
    """Minerva's normalisation of a final answer (units and words removed, \\text / \\boxed unwrapped)."""
    answer = answer.split("=")[-1]
    for before, after in _SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expr in _REMOVED:
        answer = answer.replace(expr, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer


def extract_math_answer(text: str) -> str | None:
    """The answer of a MATH-style completion or solution: last \\boxed{}, else Minerva's
    'Final Answer: The final answer is X. I hope it is correct.', else 'The answer is X'."""
    boxed = remove_boxed(last_boxed_only_string(text))
    if boxed is not None:
        return boxed
    m = _MINERVA_FINAL.search(text)
    if m:
        return m.group(1).strip()
    m = re.search(r"[Tt]he answer is[:\s]*(.+?)(?:\.\s|\.$|$)", text.strip())
    if m:
        return m.group(1).strip().strip("$")
    return None


def math_equal(a: str | None, b: str | None) -> bool:
    """Equivalence of two MATH answers: equal after strip_math_answer, or after Minerva's
    normalisation, or equal as numbers."""
    if a is None or b is None:
        return False
    sa, sb = strip_math_answer(a), strip_math_answer(b)
    if sa == sb:
        return True
    if normalize_final_answer(a) == normalize_final_answer(b):
        return True
    na, nb = normalize_number(_frac_to_plain(sa)), normalize_number(_frac_to_plain(sb))
    return na is not None and numbers_equal(na, nb)


def _frac_to_plain(s: str) -> str:
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}", s)
    return f"{m.group(1)}{m.group(2)}/{m.group(3)}" if m else s


def math_correct(completion: str, reference: str) -> bool:
    """Whether a completion answers a MATH problem correctly. `reference` is a full solution
    (its last \\boxed{} is the answer) or a bare answer."""
    gold = extract_math_answer(reference)
    if gold is None:
        gold = reference
    return math_equal(extract_math_answer(completion), gold)


# ----------------------------------------------------------------------------- code
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MBPP_STOP = ("[DONE]",)
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def truncate_at_stops(text: str, stops: Iterable[str]) -> str:
    """`text` up to the earliest of `stops` (unchanged when none occurs)."""
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


def extract_code(text: str) -> str:
    """The code in a completion: the first fenced ``` block (python or unlabelled) when there is
    one, else the text itself; MBPP's [BEGIN] / [DONE] markers are removed."""
    text = text.replace("[BEGIN]", "").split("[DONE]")[0]
    blocks = _FENCE.findall(text)
    for lang, body in blocks:
        if lang.lower() in ("", "python", "py", "python3"):
            return body.rstrip() + "\n"
    if blocks:
        return blocks[0][1].rstrip() + "\n"
    return text


def _header_imports(prompt: str) -> str:
    return "".join(line + "\n" for line in prompt.splitlines()
                   if line.startswith("import ") or (line.startswith("from ") and " import " in line))


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program the sandbox runs for one HumanEval completion.

    A completion that continues the prompt (a base model's function body) is appended to the
    prompt; one that writes the whole function itself (an instruct model's fenced answer) replaces
    it, keeping the prompt's imports. Then the tests and check(entry_point)."""
    code = extract_code(completion) if "```" in completion else completion
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        body = _header_imports(prompt) + code
    else:
        body = prompt + code
    return f"{body}\n\n{test}\n\ncheck({entry_point})\n"


def mbpp_program(completion: str, test_list: Sequence[str], test_setup_code: str = "") -> str:
    """The program the sandbox runs for one MBPP completion: setup, the code, then the asserts."""
    code = extract_code(completion)
    tests = "\n".join(test_list)
    setup = f"{test_setup_code}\n" if test_setup_code else ""
    return f"{setup}{code}\n\n{tests}\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples of which c passed (Chen et al. 2021)."""
    if n < 1 or k < 1 or c < 0 or c > n:
        raise ValueError(f"need n >= 1, k >= 1 and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))
