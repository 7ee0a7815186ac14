"""HumanEval as the study ran it on Dream (`--profile paper`; docs/fidelity.md item 10).

The study's scripts (scripts/dream_*_code.sh) evaluate Dream on the lm-evaluation-harness task
`humaneval_instruct_noprefix` (its fork, lm_eval/tasks/humaneval/): the problem is put in an instruction,
the answer opens with a python code fence, and each answer is cut out of its fence, appended to the prompt
and passed through `sanitize` (tasks/humaneval/sanitize_utils.py), which keeps the longest syntactically
valid run of lines and, of it, the imports and the definitions the entry point reaches. This module states
those steps again (written from reading that code, not copied); the sandbox then runs the program with the
tests, as the harness's code_eval does (program + "\\n" + test + "\\ncheck(entry_point)").
"""
from __future__ import annotations

import ast

# humaneval_instruct_noprefix.yaml
STUDY_HUMANEVAL_INSTRUCTION = "Write a solution to the following problem and make sure that it passes the tests:\n"
STUDY_HUMANEVAL_GEN_PREFIX = "```python\n"   # the assistant's answer opens with it (a chat prefill)
STUDY_HUMANEVAL_UNTIL = ("\nassert", "\n# Test")   # not applied: the study's Dream model escapes `until`
MAX_LINES = 100   # extract_longest_valid_code looks at the first 100 lines


def study_humaneval_prompt(prompt: str) -> str:
    """The user turn: the instruction, then the problem between code fences (no language tag, no newline)."""
    return f"{STUDY_HUMANEVAL_INSTRUCTION}```{prompt}```"


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, MemoryError, ValueError):   # ValueError: null bytes (the study's check would raise)
        return False
    return True


def longest_valid_code(text: str) -> str:
    """Of the runs of consecutive lines (among the first 100) that parse, the first with the most non-blank
    lines; "" when none does."""
    lines = text.splitlines()[:MAX_LINES]
    best, best_count = "", 0
    for i in range(len(lines)):
        count = 0
        for j in range(i, len(lines)):
            count += bool(lines[j].strip())
            if count > best_count:
                snippet = "\n".join(lines[i:j + 1])
                if _parses(snippet):
                    best, best_count = snippet, count
    return best


def _names_used(node: ast.AST) -> set[str]:
    """The names a definition mentions: every Name's id and every Attribute's attribute (not what the
    attribute is taken of), found below the node itself."""
    used: set[str] = set()
    stack = [node]
    while stack:
        for child in ast.iter_child_nodes(stack.pop()):
            if isinstance(child, ast.Name):
                used.add(child.id)
            elif isinstance(child, ast.Attribute):
                used.add(child.attr)
            else:
                stack.append(child)
    return used


def _reachable(entry_point: str, uses: dict[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    todo = [entry_point]
    while todo:
        name = todo.pop(0)
        if name not in seen:
            seen.add(name)
            todo.extend(uses.get(name, set()) - seen)
    return seen


def study_sanitize(text: str, entry_point: str | None = None) -> str:
    """sanitize(): tabs to four spaces, line ends normalised, stripped; the longest valid code; of its
    top-level statements the imports, classes, functions that contain a return and assignments to a name
    (a later one of a name replacing an earlier in its place), kept where the entry point reaches them;
    each written back by ast.unparse, one per line."""
    text = text.replace("\t", "    ").replace("\r\n", "\n").replace("\r", "\n").strip() + "\n"
    tree = ast.parse(longest_valid_code(text))
    imports: list[ast.AST] = []
    definitions: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(node)
        elif isinstance(node, ast.ClassDef):
            definitions[node.name] = node
        elif isinstance(node, ast.FunctionDef):
            if any(isinstance(n, ast.Return) for n in ast.walk(node)):
                definitions[node.name] = node
        elif isinstance(node, ast.Assign) and node.targets and isinstance(node.targets[0], ast.Name):
            definitions[node.targets[0].id] = node
    keep = None
    if entry_point:
        keep = _reachable(entry_point, {name: _names_used(node) for name, node in definitions.items()})
    out = [ast.unparse(node) for node in imports]
    out += [ast.unparse(node) for name, node in definitions.items() if keep is None or name in keep]
    return "\n".join(out)


def study_humaneval_answer(prompt: str, response: str, entry_point: str) -> str:
    """build_predictions_instruct: the response's code (after a ```python fence if it writes one, up to the
    next fence), appended to the prompt after a newline, sanitized."""
    code = response.split("```python\n", 1)[-1].split("```")[0]
    return study_sanitize(prompt + "\n" + code, entry_point)


def study_humaneval_program(prompt: str, response: str, test: str, entry_point: str) -> str:
    """The program pass@1 runs: the sanitized answer, then the tests and check(entry_point) (code_eval's
    candidate + "\\n" + reference, the reference being the task's doc_to_target)."""
    return study_humaneval_answer(prompt, response, entry_point) + "\n" + f"{test}\ncheck({entry_point})"
