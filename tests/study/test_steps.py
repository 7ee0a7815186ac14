"""Quantization x denoising steps (issue 19): per-step disagreement and flips against hand-computed values,
the recorder against what the sampler returns, and the script end to end (identical rows at 1 and 2 threads,
bad input refused in one sentence)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dllmq
from dllmq.diffusion.llada_sampler import llada_generate
from dllmq.diffusion.trajectory import StepRecorder, step_disagreement
from dllmq.evaluate.mini import GEN_SETTINGS, evaluate_mini
from dllmq.study.evidence import item_contrast
from dllmq.study.stats import Resampler
from dllmq.study.steps import StepsGrid, check_grid, setting_rows

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "steps_study.py"
M = 99   # the mask id of the hand-made states


def states(*rows_by_step):
    return [torch.tensor(s) for s in rows_by_step]


# two rows, answer of 4 tokens, 2 steps of 2 tokens each
FP_STATES = states([[1, M, 2, M], [M, M, 5, 6]],
                   [[1, 3, 2, 4], [7, 8, 5, 6]])
Q_STATES = states([[1, M, M, 9], [M, M, 5, 6]],      # row 0: 1 of FP's 2 held (pos 2 still masked here)
                  [[1, 3, 2, 9], [8, 7, 5, 6]])      # row 0: pos 3 differs; row 1: pos 0, 1 differ


def test_step_disagreement_by_hand():
    assert step_disagreement(FP_STATES, Q_STATES, M) == [[1 / 2, 1 / 4], [0.0, 2 / 4]]
    assert step_disagreement(FP_STATES, FP_STATES, M) == [[0.0, 0.0], [0.0, 0.0]]
    # nothing committed by the reference yet: nothing to disagree on
    assert step_disagreement(states([[M, M]]), states([[1, 2]]), M) == [[0.0]]
    with pytest.raises(ValueError):
        step_disagreement(FP_STATES, Q_STATES[:1], M)


def test_item_contrast_by_hand():
    rs = Resampler({"t": 5}, reps=200, seed=0)
    c = item_contrast([1, 1, 0, 0, 1], [1, 0, 1, 0, 0], "t", rs, ["a", "b", "c", "d", "e"],
                      ["a", "x", "y", "d", "e"])
    assert c["drop"].value == pytest.approx(20.0)            # FP 3/5 right, the setting 2/5
    assert c["right_to_wrong"].value == pytest.approx(2 / 5)
    assert c["wrong_to_right"].value == pytest.approx(1 / 5)
    assert c["changed"].value == pytest.approx(2 / 5)
    # paired: the replicates of the drop are those of the per-item differences on the same resampled items
    d = 100.0 * (np.array([1, 1, 0, 0, 1.0]) - np.array([1, 0, 1, 0, 0.0]))
    assert np.array_equal(c["drop"].reps, d[rs.indices("t")].mean(axis=1))
    assert "changed" not in item_contrast([1], [0], "u", Resampler({"u": 1}, reps=10))


def test_setting_rows_by_hand():
    fp = {"t": {"2/random": {"correct": [1, 0], "answers": ["1", "2"], "states": FP_STATES}}}
    q = {"t": {"2/random": {"correct": [0, 0], "answers": ["5", "2"], "states": Q_STATES}}}
    rs = Resampler({}, reps=100, seed=0)
    (row,) = setting_rows("Q", q, fp, M, rs)
    assert (row["task"], row["steps"], row["remasking"], row["n"]) == ("t", 2, "random", 2)
    assert row["acc"]["value"] == 0.0 and row["delta_acc"]["value"] == pytest.approx(-50.0)
    assert (row["right_to_wrong"], row["wrong_to_right"], row["changed"]) == (1, 0, 1)
    assert row["flipped"]["value"] == pytest.approx(50.0)
    assert row["disagree_by_step"] == pytest.approx([1 / 4, 3 / 8])        # per-step means over the 2 rows
    assert row["disagree@0.25"]["value"] == pytest.approx(25.0)            # step 1 of 2 (ceil(0.5) = 1)
    assert row["disagree@0.5"]["value"] == pytest.approx(25.0)
    assert row["disagree@1"]["value"] == pytest.approx(37.5)
    assert row["disagree_mean"]["value"] == pytest.approx(100 * (3 / 4 + 2 / 4) / 4)   # rows' means, averaged
    (same,) = setting_rows("FP", fp, fp, M, rs)
    assert same["delta_acc"] == {"value": 0.0, "lo": 0.0, "hi": 0.0} and same["disagree_mean"]["value"] == 0.0


@pytest.fixture(scope="module")
def llada():
    model, tok, _ = dllmq.load_model("random-llada", dtype="float32")
    return model.eval(), tok


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_recorder_keeps_what_the_sampler_returns(llada, remasking):
    model, _ = llada
    prompts = torch.randint(3, 250, (5, 7), generator=torch.Generator().manual_seed(4))
    rec = StepRecorder(8)
    outs = [llada_generate(model, prompts[a:b], gen_length=8, steps=4, block_length=4, remasking=remasking,
                           callback=rec) for a, b in ((0, 3), (3, 5))]          # two batches
    got = rec.states()
    assert len(got) == 4 and all(s.shape == (5, 8) for s in got)
    assert torch.equal(got[-1], torch.cat(outs)[:, -8:])
    mask_id = dllmq.diffusion.logits.mask_token_id(model)
    assert [int((s != mask_id).sum()) for s in got] == [5 * 2, 5 * 4, 5 * 6, 5 * 8]   # 2 tokens a step


def test_generation_overrides_equal_to_the_preset_change_nothing(llada):
    model, tok = llada
    plain = evaluate_mini(model, tok, ["mini_math"], limit=3, progress=False, batch_size=2, return_samples=True)
    same = evaluate_mini(model, tok, ["mini_math"], limit=3, progress=False, batch_size=2, return_samples=True,
                         generation=GEN_SETTINGS["mini_math", False], step_callback=StepRecorder(8))
    assert plain == same


def test_bad_grids_are_refused():
    from dllmq.errors import DllmqError
    for bad in (dict(steps=(3,)), dict(steps=(64,)), dict(tasks=("mini_general",)), dict(remasking=("best",)),
                dict(methods=("gptq:W3A16-g128",)), dict(limit=1), dict(block_length=5)):
        with pytest.raises(DllmqError):
            check_grid(StepsGrid(**bad))
    check_grid(StepsGrid())


def run(*args: str, threads: int = 1) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS=str(threads))
    return subprocess.run([sys.executable, str(SCRIPT), *args, "--threads", str(threads)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_quick_run_end_to_end_same_rows_at_1_and_2_threads(tmp_path):
    results = []
    for threads in (1, 2):
        r = run("--quick", "--out", str(tmp_path / f"t{threads}"), threads=threads)
        assert r.returncode == 0, r.stderr[-2000:]
        results.append(json.loads((tmp_path / f"t{threads}.json").read_text()))
        assert (tmp_path / f"t{threads}.md").read_text().count("| rtn W4A16-g128 |") == 4
    a, b = results
    assert a["cost"]["threads"] == 1 and b["cost"]["threads"] == 2
    assert a["rows"] == b["rows"] and len(a["rows"]) == 2 * 2 * 2        # 2 methods x 2 steps x 2 remaskings
    for row in a["rows"]:
        assert len(row["disagree_by_step"]) == row["steps"] and row["n"] == 4
        if row["method"] == "FP":                                      # FP against itself: nothing differs
            assert row["changed"] == 0 and row["disagree_mean"]["value"] == 0.0


def test_bad_input_is_one_sentence_and_exit_code_2(tmp_path):
    r = run("--steps", "3", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr.startswith("error: steps 3 must be a multiple") and "Traceback" not in r.stderr
    assert not (tmp_path / "x.json").exists()


def test_random_remasking_reveals_the_same_positions_for_any_model(llada):
    """With the same seed both runs draw the same random confidences, so under random remasking a perturbed model
    commits exactly FP's positions step by step and the disagreement is only in tokens."""
    import copy
    model, _ = llada
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in noisy.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * 0.5)
    prompts = torch.randint(3, 250, (6, 7), generator=torch.Generator().manual_seed(5))
    mask_id = dllmq.diffusion.logits.mask_token_id(model)
    runs = {}
    for name, m in (("fp", model), ("noisy", noisy)):
        for remasking in ("random", "low_confidence"):
            rec = StepRecorder(16)
            llada_generate(m, prompts, gen_length=16, steps=8, block_length=8, remasking=remasking, callback=rec)
            runs[name, remasking] = rec.states()
    same = [torch.equal(a == mask_id, b == mask_id) for a, b in zip(runs["fp", "random"], runs["noisy", "random"])]
    assert all(same)
    assert any(any(row) for row in step_disagreement(runs["fp", "random"], runs["noisy", "random"], mask_id))
    # low-confidence remasking lets the model choose, and the perturbed one chooses other positions somewhere
    assert not all(torch.equal(a == mask_id, b == mask_id)
                   for a, b in zip(runs["fp", "low_confidence"], runs["noisy", "low_confidence"]))


def test_quantized_models_share_the_study_cache_keys():
    """The default grid's quantized models are the default study's (same quant keys), so a study cache is reused."""
    from dllmq.study.cells import model_is_readable, plan_cells
    from dllmq.study.config import default_config
    from dllmq.study.steps import plan
    if model_is_readable("dllmq-tiny-instruct") is not None:
        pytest.skip("dllmq-tiny-instruct is not installed")
    _, cells = plan(StepsGrid())
    study = {c.quant_key for c in plan_cells(default_config()) if c.model == "dllmq-tiny-instruct"}
    mine = [c.quant_key for c in cells if not c.is_fp]
    assert len(mine) == 4 and set(mine) <= study
