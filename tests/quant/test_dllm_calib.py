"""dLLM-aware calibration (issue 19): mask schedules give the ratios asked for and never mask a prompt,
masks are placed as LLaDA's pre-training places them, the sampler schedule is what the sampler visits,
token weights of 1 reproduce the unweighted methods exactly (GPTQ codes, AWQ scales), the weighted
Hessian is the textbook sum and does not depend on the thread count, and the settings are recorded
only when they are not the default."""
import json
import math

import pytest
import torch

from dllmq.cli import main
from dllmq.data import chat_windows
from dllmq.diffusion.llada_sampler import llada_generate
from dllmq.errors import DllmqError
from dllmq.models.random_models import random_model
from dllmq.quant import QuantConfig, quantize
from dllmq.quant.dllm_calib import (
    EPS,
    certainty_weights,
    fp_confidence,
    frontier,
    mask_windows,
    parse_mask_schedule,
    parse_weighting,
    sampler_ratios,
    trajectory_windows,
    window_ratios,
)
from dllmq.quant.gptq_solver import HessianAccumulator
from dllmq.quant.pipeline import quantize_model
from dllmq.quant.qlinear import QuantLinear
from dllmq.study.config import load_config, parse_study_config

MASK = 999
_, TOKENIZER = random_model("random-llada")   # one tokenizer, so the calibration text is tokenized once


def tokens(n, length, seed=0):
    return torch.randint(0, 250, (n, length), generator=torch.Generator().manual_seed(seed))


# -- schedules ------------------------------------------------------------------------------------------
def test_fixed_list_gives_each_ratio_equally_and_masks_binomially():
    n, length = 600, 256
    w = mask_windows(tokens(n, length), "0.25,0.5,1", MASK, seed=3)
    for r in (0.25, 0.5, 1.0):
        rows = w.ratios == r
        assert rows.sum() == n // 3                          # stratified: exactly a third each
        frac = w.masked[rows].float().mean().item()
        sd = math.sqrt(r * (1 - r) / (rows.sum().item() * length))
        assert abs(frac - r) <= 4 * sd + 1e-12, (r, frac)
    assert torch.equal(w.ids == MASK, w.masked)


def test_masks_are_independent_per_token_like_pretraining():
    """Per-token Bernoulli(p), not a fixed count per window: the count varies as a binomial does."""
    n, length, p = 400, 200, 0.5
    w = mask_windows(tokens(n, length), "0.5", MASK, seed=1)
    counts = w.masked.sum(1).double()
    assert abs(counts.mean().item() - length * p) < 4 * math.sqrt(length * p * (1 - p) / n)
    var = counts.var().item()
    assert 0.7 * length * p * (1 - p) < var < 1.3 * length * p * (1 - p)


def test_uniform_schedule_covers_the_diffusion_time_evenly():
    n = 2000
    r = window_ratios("uniform", n, torch.Generator().manual_seed(0))
    assert r.min() > EPS - 1e-12 and r.max() <= 1
    # stratified: the empirical CDF of t = (r - eps) / (1 - eps) is within 1/n of the uniform one
    t = ((r - EPS) / (1 - EPS)).sort().values
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert (t - grid).abs().max() <= 1 / n + 1e-12
    w = mask_windows(tokens(n, 64), "uniform", MASK, seed=0)
    total = w.masked.sum().item() / w.masked.numel()
    assert abs(total - (0.5 * (1 - EPS) + EPS)) < 0.01


@pytest.mark.parametrize("steps, gen_length, block_length", [(8, 16, 16), (8, 16, 4), (6, 12, 4)])
def test_sampler_schedule_is_what_the_sampler_visits(steps, gen_length, block_length):
    model, _ = random_model("random-llada", seed=2)
    prompt = tokens(1, 5)
    before = [1.0]     # the answer is all masks before the first step

    def seen(step, x):
        if step < steps:
            before.append(int((x[0, 5:] == model.config.mask_token_id).sum()) / gen_length)

    llada_generate(model, prompt, gen_length=gen_length, steps=steps, block_length=block_length, callback=seen)
    assert sampler_ratios(steps, gen_length, block_length) == before
    schedule = parse_mask_schedule(f"sampler:steps={steps},gen_length={gen_length},block_length={block_length}")
    r = window_ratios(schedule, 10 * steps, torch.Generator().manual_seed(0))
    assert sorted(set(r.tolist())) == sorted(set(before))
    for ratio in set(before):   # stratified over the visited list: each step's ratio as often as it is visited
        assert (r == ratio).sum().item() == 10 * before.count(ratio)


def test_prompts_are_never_masked():
    n, length = 50, 40
    ids = tokens(n, length)
    prompt_len = torch.randint(0, length, (n,), generator=torch.Generator().manual_seed(5))
    maskable = torch.arange(length)[None] >= prompt_len[:, None]
    for schedule in ("1", "uniform", "sampler", "0.3,0.9"):
        w = mask_windows(ids, schedule, MASK, seed=2, maskable=maskable)
        assert not w.masked[~maskable].any()
        assert torch.equal(w.ids[~maskable], ids[~maskable])
    full = mask_windows(ids, "1", MASK, seed=2, maskable=maskable)
    assert torch.equal(full.masked, maskable)      # ratio 1 masks every response token


def test_masks_are_seeded():
    a, b = (mask_windows(tokens(8, 32), "uniform", MASK, seed=4) for _ in range(2))
    c = mask_windows(tokens(8, 32), "uniform", MASK, seed=5)
    assert torch.equal(a.ids, b.ids) and not torch.equal(a.ids, c.ids)


# -- parsing and the config -----------------------------------------------------------------------------
def test_canonical_forms():
    assert parse_mask_schedule(None) == "none"
    assert parse_mask_schedule([0.25, 0.5, 1.0]) == parse_mask_schedule(" 0.25, 0.5,1.0") == "0.25,0.5,1"
    assert parse_mask_schedule("sampler:steps=128") == "sampler"
    assert parse_mask_schedule("Sampler:block_length=32") == "sampler:steps=128,gen_length=128,block_length=32"
    assert parse_weighting("certainty") == "masked=1,unmasked=0.5,frontier=2,k=4,steps=128"
    assert parse_weighting("frontier=3") == "masked=1,unmasked=0.5,frontier=3,k=4,steps=128"


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(mask_schedule="0"), "ratios must lie in (0, 1]"),
    (dict(mask_schedule="half"), "is not a ratio"),
    (dict(mask_schedule="sampler:steps=5,block_length=32"), "multiple of the number of blocks"),
    (dict(mask_schedule="sampler:depth=3"), "sampler has 'depth=3'"),
    (dict(weighting="certainty"), "give --mask-schedule too"),
    (dict(mask_schedule="uniform", weighting="masked=-1"), "must be >= 0"),
    (dict(mask_schedule="uniform", weighting="k=1.5"), "k must be a whole number"),
])
def test_bad_values_are_one_sentence(kwargs, fragment):
    with pytest.raises(DllmqError, match="^[^\n]+$") as err:
        QuantConfig("gptq", **kwargs)
    assert fragment in str(err.value)


def test_methods_that_cannot_use_an_option_refuse_it():
    with pytest.raises(DllmqError, match="does not calibrate"):
        QuantConfig("rtn", mask_schedule="uniform")
    with pytest.raises(DllmqError, match="smoothquant with these settings has neither"):
        QuantConfig("smoothquant", wbits=8, abits=8, mask_schedule="uniform", weighting="certainty")
    QuantConfig("smoothquant", wbits=8, abits=8, mask_schedule="uniform")          # masking applies to every method
    QuantConfig("quarot", wbits=4, abits=4, mask_schedule="uniform", weighting="certainty")   # its GPTQ weights


def test_defaults_are_not_recorded_and_settings_round_trip():
    plain = QuantConfig("gptq").to_dict()
    assert "mask_schedule" not in plain and "weighting" not in plain
    config = QuantConfig("awq", mask_schedule=[0.5, 1.0], weighting="certainty")
    d = config.to_dict()
    assert d["mask_schedule"] == "0.5,1" and d["weighting"].startswith("masked=1,")
    assert QuantConfig.from_dict(json.loads(json.dumps(d))) == config


# -- weights ------------------------------------------------------------------------------------------
def test_frontier_is_the_most_confident_masked_tokens():
    masked = torch.tensor([[1, 1, 0, 1, 1, 1, 0, 1]], dtype=torch.bool)
    maskable = torch.ones_like(masked)
    conf = torch.tensor([[0.9, 0.1, 0.99, 0.5, 0.7, 0.3, 0.95, 0.6]])
    # 8 maskable tokens in 4 steps: 2 per step; k=1 -> the 2 most confident masked (0.9, 0.7)
    assert frontier(conf, masked, maskable, k=1, steps=4).nonzero()[:, 1].tolist() == [0, 4]
    assert frontier(conf, masked, maskable, k=2, steps=4).nonzero()[:, 1].tolist() == [0, 3, 4, 7]
    assert torch.equal(frontier(conf, masked, maskable, k=9, steps=4), masked)   # never more than the masked
    windows = mask_windows(torch.zeros(1, 8, dtype=torch.long), "1", MASK)
    windows.masked, windows.maskable = masked, maskable
    w = certainty_weights(windows, conf, "masked=1,unmasked=0.25,frontier=3,k=1,steps=4")
    assert w.tolist() == [[3, 1, 0.25, 1, 3, 1, 0.25, 1]]


def test_fp_confidence_is_the_models_top_probability():
    for name in ("random-llada", "random-dream"):
        model, _ = random_model(name, seed=1)
        ids = tokens(5, 24, seed=2)
        ids[:, ::3] = model.config.mask_token_id
        got = fp_confidence(model, ids, torch.device("cpu"), batch_tokens=48, head_tokens=7)
        with torch.no_grad():
            logits = model(ids).float()
        logits[..., model.config.mask_token_id] = float("-inf")
        want = logits.softmax(-1).amax(-1)
        if model.family.shift_logits:
            want = torch.cat([want[:, :1], want[:, :-1]], dim=1)
        assert torch.allclose(got, want, atol=1e-6), name


def test_weighted_hessian_is_the_textbook_sum_and_ones_change_nothing():
    x = torch.randn(3, 700, 24, generator=torch.Generator().manual_seed(0))
    w = torch.rand(3, 700, generator=torch.Generator().manual_seed(1))
    acc = HessianAccumulator(24, "cpu")
    acc.add(x, w)
    flat, fw = x.reshape(-1, 24).double(), w.reshape(-1).double()
    assert torch.allclose(acc.H.double(), 2 * (flat * fw[:, None]).T @ flat / 2100, rtol=1e-5, atol=1e-6)
    plain, ones = HessianAccumulator(24, "cpu"), HessianAccumulator(24, "cpu")
    plain.add(x)
    ones.add(x, torch.ones(3, 700))
    assert torch.equal(plain.H, ones.H)
    per_window = HessianAccumulator(24, "cpu")
    for xi, wi in zip(x, w):
        per_window.add(xi[None], wi[None])
    assert torch.equal(per_window.H, acc.H)


def test_weighted_hessian_does_not_depend_on_the_thread_count():
    x = torch.randn(4, 1100, 384, generator=torch.Generator().manual_seed(0))
    w = torch.rand(4, 1100, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    found = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            acc = HessianAccumulator(384, "cpu")
            acc.add(x, w)
            found.append(acc.H)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*found)


def _state(model):
    return {n: (m.qweight.clone(), m.scales.clone(), m.qzeros.clone()) for n, m in model.named_modules()
            if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("method, extra", [("gptq", {}), ("awq", dict(awq_search_tokens=64, awq_clip_tokens=40)),
                                           ("awq", dict(awq_score_block=True, awq_search_tokens=100))])
def test_weights_of_one_reproduce_the_unweighted_method_exactly(method, extra):
    config = QuantConfig(method, wbits=3, group_size=32, nsamples=6, seqlen=32, **extra)
    ids = tokens(6, 32, seed=3)
    states = []
    for weights in (None, torch.ones(6, 32)):
        model, _ = random_model("random-llada", seed=4)
        quantize_model(model, config.make_method(), ids, progress=False, batch_tokens=64, token_weights=weights)
        states.append(_state(model))
    assert states[0].keys() == states[1].keys() and states[0]
    for key in states[0]:
        for a, b in zip(states[0][key], states[1][key]):   # codes, scales (AWQ's folded ones inside), zeros
            assert torch.equal(a, b), key


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_equal_weighting_through_the_config_equals_masking_alone(method):
    base = dict(wbits=3, group_size=32, nsamples=4, seqlen=48)
    states = []
    for weighting in (None, "masked=1,unmasked=1,frontier=1"):
        model, _ = random_model("random-llada", seed=4)
        quantize(model, TOKENIZER, QuantConfig(method, mask_schedule="uniform", weighting=weighting, **base),
                 progress=False)
        states.append(_state(model))
    for key in states[0]:
        for a, b in zip(states[0][key], states[1][key]):
            assert torch.equal(a, b), key


def test_options_change_the_calibration():
    base = dict(wbits=3, group_size=32, nsamples=4, seqlen=48)
    states = []
    for extra in ({}, dict(mask_schedule="uniform"), dict(mask_schedule="uniform", weighting="certainty")):
        model, _ = random_model("random-llada", seed=4)
        quantize(model, TOKENIZER, QuantConfig("gptq", **base, **extra), progress=False)
        states.append(_state(model))
    for a, b in ((0, 1), (1, 2)):
        assert any(not torch.equal(states[a][k][0], states[b][k][0]) for k in states[a])


def test_masked_calibration_refuses_an_autoregressive_model():
    model, _ = random_model("random-llama", seed=0)
    with pytest.raises(DllmqError, match="autoregressive family"):
        quantize(model, TOKENIZER, QuantConfig("gptq", nsamples=2, seqlen=16, mask_schedule="uniform"),
                 progress=False)


# -- the command line and the study ---------------------------------------------------------------------
def test_cli_bad_values_exit_2_and_good_ones_are_saved(capsys, tmp_path):
    for argv, fragment in ((["--mask-schedule", "2"], "ratios must lie in (0, 1]"),
                           (["--weighting", "certainty"], "give --mask-schedule too")):
        code = main(["quantize", "random-llada", "--method", "gptq", *argv, "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: ") and "\n" not in err and fragment in err
    out = tmp_path / "q"
    code = main(["quantize", "random-llada", "--method", "gptq", "--nsamples", "2", "--seqlen", "16",
                 "--mask-schedule", "0.5,1", "--weighting", "certainty", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((out / "config.json").read_text())["quantization_config"]["dllmq"]
    assert saved["mask_schedule"] == "0.5,1" and saved["weighting"] == parse_weighting("certainty")


def test_study_entries_take_the_options_and_the_example_grid_parses():
    config = parse_study_config({"models": ["random-llada"], "tasks": ["mini_math"], "methods": [
        {"name": "gptq", "bits": ["W3A16-g128"]},
        {"name": "gptq", "bits": ["W3A16-g128"], "mask_schedule": "uniform", "label": "gptq-masked"},
        {"name": "gptq", "bits": ["W3A16-g128"], "mask_schedule": [0.25, 0.5, 1.0], "weighting": "certainty",
         "label": "gptq-both"}]})
    settings = {m.label: m.quant_config("W3A16-g128", config.calibration, 0).to_dict() for m in config.methods}
    assert "mask_schedule" not in settings["gptq"]
    assert settings["gptq-masked"]["mask_schedule"] == "uniform"
    assert settings["gptq-both"]["mask_schedule"] == "0.25,0.5,1"
    from importlib import resources
    path = resources.files("dllmq.study").joinpath("dllm_aware.yaml")
    grid = load_config(str(path))
    labels = {m.label for m in grid.methods}
    assert {"gptq", "gptq-masked", "gptq-sampler", "gptq-weighted", "awq-weighted", "quarot-weighted",
            "duquant-masked", "gptq-trajectory"} <= labels and len(grid.methods) == 17


def test_chat_windows_never_mask_the_prompt(tmp_path):
    path = tmp_path / "chat.jsonl"
    records = [{"prompt": f"Question {i}: what is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in records))
    model, _ = random_model("random-llada", seed=4)
    ids, response = chat_windows(TOKENIZER, path, 8, 64, seed=1)
    assert ids.shape == response.shape == (8, 64)
    for row, resp in zip(ids, response):
        text = TOKENIZER.decode(row[~resp].tolist())
        assert "Question" in text and "It is" not in text         # the prompt (in the chat template) is unmaskable
        assert TOKENIZER.decode(row[resp].tolist()).startswith("It is")
    config = QuantConfig("gptq", wbits=3, group_size=32, nsamples=8, seqlen=64, calib=str(path),
                         calib_windows="chat", mask_schedule="1")
    from dllmq.quant.api import calibration_windows, dllm_aware_calibration
    calib, maskable = calibration_windows(model, TOKENIZER, config)
    masked, _ = dllm_aware_calibration(model, calib, config, torch.device("cpu"), maskable)
    mask_id = model.config.mask_token_id
    assert torch.equal(masked == mask_id, maskable) and torch.equal(masked[~maskable], calib[~maskable])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no prompt"}))
    with pytest.raises(DllmqError, match="lacks a string"):
        calibration_windows(model, TOKENIZER, QuantConfig("gptq", calib=str(bad), calib_windows="chat", seqlen=64))


def test_trajectory_states_are_what_the_sampler_visits():
    model, _ = random_model("random-llada", seed=2)
    ids = tokens(5, 20, seed=7)
    schedule = parse_mask_schedule("trajectory:steps=6,gen_length=12,block_length=4,states=3")
    assert schedule == "trajectory:steps=6,gen_length=12,block_length=4,states=3"
    windows = trajectory_windows(model, ids, schedule, seed=3)
    mask_id = model.config.mask_token_id
    expected = []
    for row in ids[:2]:   # 5 windows from 3 states per prompt: the first two prompts
        prompt = row[None, :8]
        visited = [torch.cat([prompt, prompt.new_full((1, 12), mask_id)], dim=1)]
        llada_generate(model, prompt, gen_length=12, steps=6, block_length=4, seed=3,
                       callback=lambda step, x: visited.append(x))
        expected += [visited[i][0] for i in (0, 2, 5)]   # the states read before steps 0, 2 and 5 of 0..5
    assert torch.equal(windows.ids, torch.stack(expected[:5]))
    assert not windows.masked[:, :8].any() and torch.equal(windows.masked, windows.ids == mask_id)
    assert windows.ratios.tolist() == [1.0, 8 / 12, 2 / 12, 1.0, 8 / 12]   # 2 tokens a step
    with pytest.raises(DllmqError, match="leaves no prompt"):
        trajectory_windows(model, ids[:, :12], schedule)


def test_trajectory_calibration_runs_through_quantize():
    model, _ = random_model("random-llada", seed=4)
    config = QuantConfig("gptq", wbits=3, group_size=32, nsamples=4, seqlen=48, weighting="certainty",
                         mask_schedule="trajectory:steps=4,gen_length=16,block_length=16,states=2")
    quantize(model, TOKENIZER, config, progress=False)
    assert config.to_dict()["mask_schedule"].startswith("trajectory:")
