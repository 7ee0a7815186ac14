"""The mini benchmark: shipped data, scoring helpers, the code runner, the evaluate_mini contract."""
from __future__ import annotations

import math

import pytest

from dllmq.errors import DllmqError
from dllmq.evaluate.mini import (
    TASKS,
    code_program,
    evaluate_mini,
    expand_tasks,
    first_integer,
    load_items,
    program_with_tests,
)
from dllmq.evaluate.sandbox import run_program, run_programs


def run_many(pairs):
    return run_programs([program_with_tests(p, t) for p, t in pairs], allow_code_execution=True, workers=2)


def test_shipped_items_are_well_formed():
    for task in TASKS:
        items = load_items(task)
        assert len(items) >= 300, task
        assert len({i["id"] for i in items}) == len(items)
    for item in load_items("mini_general"):
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        assert item["choices"][item["label"]].strip() in item["context"]  # the LAMBADA-style target recurs
    for item in load_items("mini_math"):
        assert item["prompt"] == f"Question: {item['question']} Answer:"
        assert isinstance(item["answer"], int)
    assert load_items("mini_math", limit=5) == load_items("mini_math")[:5]


def test_reference_solutions_pass_and_wrong_ones_fail():
    items = load_items("mini_code")[:12]
    good = run_many([(it["prompt"] + it["reference"], it["tests"]) for it in items])
    assert all(r.passed for r in good), [r.output for r in good if not r.passed]
    bad = run_many([(it["prompt"] + "    return None\n", it["tests"]) for it in items])
    assert not any(r.passed for r in bad)


def test_code_program_cuts_the_body():
    prompt = 'def f(x):\n    """Return x plus 1."""\n'
    completion = "\n    return x + 1\n\nassert f(1) == 2\ndef g(): pass"
    assert code_program(prompt, completion, chat=False) == 'def f(x):\n    """Return x plus 1."""\n    return x + 1\n'
    assert code_program(prompt, "    return x + 1", chat=True) == prompt + "    return x + 1\n"
    program = program_with_tests(code_program(prompt, completion, False), ["assert f(1) == 2"])
    assert run_program(program, allow_code_execution=True).passed


def test_helpers():
    assert first_integer(" 42\nQuestion") == 42 and first_integer(" -7 apples") == -7
    assert first_integer(" none") is None
    assert expand_tasks("mini") == list(TASKS)
    assert expand_tasks("mini_math,mini_code") == ["mini_math", "mini_code"]
    with pytest.raises(DllmqError, match="Unknown mini task"):
        expand_tasks("mmlu")


def test_evaluate_mini_contract_on_a_random_model():
    from dllmq.evaluate.mini import score_general
    from dllmq.models import load_plain_model

    model, tok, _ = load_plain_model("random-llada")
    out = evaluate_mini(model, tok, tasks="mini_math,mini_code", limit=2, progress=False, batch_size=2)
    assert list(out) == ["mini_math", "mini_code"]
    for task, r in out.items():
        assert r["n"] == 2 and 0.0 <= r["acc"] <= 1.0 and not math.isnan(r["stderr"]) and r["chance"] == 0.0
    # general scoring (the shipped contexts are long in byte tokens; a short item keeps this fast)
    item = {"context": "Cats\nThe cat sat on the", "choices": [" mat", " sky", " dog", " car"], "label": 0}
    correct = score_general(model, tok, [item, dict(item, label=2)], progress=False)
    assert sum(correct) == 1  # the same scores, so exactly one of the two labels wins


def test_shards_at_batch_boundaries_give_the_whole_tasks_items():
    """What the study's Ray units rely on: evaluating items [start:stop] (start a multiple of the batch size for
    generation) gives each item the answer it gets in the whole task, and the summary of the concatenated
    outcomes is the whole task's summary."""
    from dllmq.evaluate.mini import summarize
    from dllmq.models import load_plain_model

    model, tok, _ = load_plain_model("random-llada")
    whole = evaluate_mini(model, tok, tasks="mini_math", limit=6, progress=False, batch_size=2,
                          return_samples=True)["mini_math"]
    parts = [evaluate_mini(model, tok, tasks="mini_math", limit=6, progress=False, batch_size=2, return_samples=True,
                           shard=shard)["mini_math"] for shard in ((0, 2), (2, 6))]
    assert [s for p in parts for s in p["samples"]] == whole["samples"]
    merged = summarize([s["correct"] for p in parts for s in p["samples"]], "mini_math")
    assert merged == {k: whole[k] for k in merged}


def test_acc_norm_divides_the_likelihood_by_the_choice_length():
    from dllmq.evaluate.mini import best_choice

    # summed log-likelihood prefers the short choice; per character (lengths 2 and 6) it depends on the ratio
    assert best_choice([-2.0, -5.0]) == 0
    assert best_choice([-2.0, -5.0], [" a", " apple"]) == 1  # -1.0 vs -0.833
    assert best_choice([-2.0, -7.0], [" a", " apple"]) == 0  # -1.0 vs -1.167


def test_acc_norm_matches_a_hand_computation_on_a_model():
    from dllmq.diffusion.likelihood import mc_loglikelihood
    from dllmq.evaluate.mini import MC_NUM, score_general
    from dllmq.models import load_plain_model

    model, tok, _ = load_plain_model("random-llada")
    item = {"context": "Cats\nThe cat sat on the", "choices": [" a", " mat", " skyscraper", " elephant"], "label": 1}
    prompt = tok(item["context"], add_special_tokens=True)["input_ids"]
    by_hand = []
    for choice in item["choices"]:
        answer = tok(choice, add_special_tokens=False)["input_ids"]
        mc = 1 if len(answer) == 1 else MC_NUM
        by_hand.append(mc_loglikelihood(model, prompt, answer, mc_num=mc, batch_size=mc, seed=0))
    plain = max(range(4), key=lambda i: by_hand[i])
    norm = max(range(4), key=lambda i: by_hand[i] / len(item["choices"][i]))
    assert plain != norm  # these choices tell the two conventions apart on this model
    for label in range(4):
        chosen, correct_norm = [], []
        correct = score_general(model, tok, [dict(item, label=label)], progress=False, chosen=chosen,
                                correct_norm=correct_norm)
        assert chosen == [plain] and correct == [plain == label] and correct_norm == [norm == label]
