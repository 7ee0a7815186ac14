"""AWQ: folding scales is exact in full precision; the search never loses to alpha = 0."""
import math

import pytest
import torch
import torch.nn.functional as F

from dllmq.models.random_models import random_model
from dllmq.quant.block import BlockContext
from dllmq.quant.config import QuantConfig
from dllmq.quant.methods.awq import AWQ, candidate_scales, clip_weight, grid_argmin, group_moments, search_precision
from dllmq.quant.pipeline import capture_block_inputs
from dllmq.quant.rounding import rtn_weight
from dllmq.quant.smoothing import can_fold, fold_scales
from dllmq.quant.specs import WeightSpec
from dllmq.quant.tokens import channel_abs_mean, sample_tokens


def block_context(name, config, n=3, length=24, dtype=torch.float64):
    model, _ = random_model(name, seed=11, dtype=dtype)
    ids = torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(0))
    inputs, rope, mask = capture_block_inputs(model, ids, torch.device("cpu"), torch.device("cpu"))
    block = model.get_blocks()[0]
    return BlockContext(block, 0, inputs, rope, mask, torch.device("cpu"), config)


@pytest.mark.parametrize("name", ["random-llada", "random-dream", "random-llama"])
def test_folding_scales_leaves_full_precision_outputs_unchanged(name):
    ctx = block_context(name, QuantConfig(method="awq"))
    before = ctx.run(keep_outputs=True)
    gen = torch.Generator().manual_seed(1)
    for group in ctx.family.groups:
        if can_fold(ctx, group):
            n_in = ctx.linear(group.linears[0]).in_features
            fold_scales(ctx, group, torch.rand(n_in, generator=gen, dtype=torch.float64) * 4 + 0.1)
    after = ctx.run(keep_outputs=True)
    for a, b in zip(before, after):  # float64: equal to rounding (stated tolerance 1e-10 relative)
        assert (a - b).norm() / a.norm() < 1e-10


def test_gqa_skips_v_to_out_but_mha_scales_it():
    dream = block_context("random-dream", QuantConfig(method="awq"))
    llada = block_context("random-llada", QuantConfig(method="awq"))
    assert not can_fold(dream, dream.family.group("attn_out"))
    assert can_fold(llada, llada.family.group("attn_out"))


@pytest.mark.parametrize("group_name", ["qkv", "gate_up", "down"])
def test_search_never_loses_to_alpha_zero(group_name):
    config = QuantConfig(method="awq", wbits=3, group_size=32, awq_search_dtype="model")
    ctx = block_context("random-llada", config, dtype=torch.float32)
    method = AWQ(config)
    group = ctx.family.group(group_name)
    feats = ctx.group_inputs()[group.role]
    s, losses = method.search_scale(ctx, group, feats)
    fn = ctx.scored_output(group)

    def loss_with(scales):  # recomputed independently of the search loop
        originals = [ctx.linear(n).weight.data.clone() for n in group.linears]
        for n in group.linears:
            w = ctx.linear(n).weight.data
            ctx.linear(n).weight.data = rtn_weight(w * scales, WeightSpec(3, 32, False)).weight / scales
        with torch.no_grad():
            out = [fn(x) for x in feats]
        for n, w in zip(group.linears, originals):
            ctx.linear(n).weight.data = w
        with torch.no_grad():
            ref = [fn(x) for x in feats]
        return sum(F.mse_loss(o, r, reduction="sum").item() for o, r in zip(out, ref)) / sum(r.numel() for r in ref)

    assert len(losses) == 20
    assert loss_with(s) <= loss_with(torch.ones_like(s)) * (1 + 1e-6)
    assert torch.allclose(candidate_scales(s.abs() + 1, None, 0.0), torch.ones_like(s))


def test_clipping_does_not_increase_output_error():
    gen = torch.Generator().manual_seed(3)
    linear = torch.nn.Linear(64, 16, bias=False)
    linear.weight.data = torch.randn(16, 64, generator=gen)
    linear.weight.data[0, 5] = 12.0  # one outlier weight makes the plain grid coarse
    x = torch.randn(256, 64, generator=gen)
    w = linear.weight.data.clone()
    before = (x @ (rtn_weight(w, WeightSpec(3, 32, False)).weight - w).T).norm()
    clip_weight(linear, x, WeightSpec(3, 32, False), n_grid=20, max_shrink=0.5)
    after = (x @ (rtn_weight(linear.weight.data, WeightSpec(3, 32, False)).weight - w).T).norm()
    assert after <= before


def textbook_clip(w, x, spec, n_grid, max_shrink, token_weights=None):
    """The clip search as the reference writes it: every candidate's partial outputs x_g . q_g against
    x_g . w_g, token by token, in float64."""
    x = x.double()
    g = spec.group_size
    out = w.clone()
    tw = torch.ones(x.shape[0], dtype=torch.float64) if token_weights is None else token_weights.double()
    for o in range(w.shape[0]):
        for j in range(0, w.shape[1], g):
            wg, xg = w[o, j:j + g], x[:, j:j + g]
            best, best_err = wg.abs().max(), math.inf
            for i in range(int(max_shrink * n_grid)):
                m = wg.abs().max() * (1 - i / n_grid)     # float32, as the weights are
                q = rtn_weight(wg.clamp(-m, m)[None], WeightSpec(spec.bits, g, spec.sym)).weight[0]
                err = ((xg @ q.double() - xg @ wg.double()).pow(2) * tw).sum().item() / x.shape[0]
                if err < best_err:
                    best, best_err = m, err
            out[o, j:j + g] = wg.clamp(-best, best)
    return out


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("sym", [False, True])
def test_clip_search_through_group_moments_equals_the_token_by_token_search(weighted, sym):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(12, 96, generator=gen)
    w[3, 7], w[8, 70] = 9.0, -7.0                   # outliers that make clipping pay
    x = torch.randn(300, 96, generator=gen) * torch.rand(96, generator=gen) * 3
    tw = torch.rand(300, generator=gen) if weighted else None
    spec = WeightSpec(3, 32, sym)
    linear = torch.nn.Linear(96, 12, bias=False)
    linear.weight.data = w.clone()
    clip_weight(linear, x, spec, n_grid=20, max_shrink=0.5, token_weights=tw)
    expected = textbook_clip(w, x, spec, 20, 0.5, tw)
    assert torch.equal(linear.weight.data, expected)
    assert not torch.equal(linear.weight.data, w)    # the search clipped something


def test_group_moments_do_not_depend_on_the_thread_count():
    x = torch.randn(1500, 200, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = group_moments(x, 64)
        torch.set_num_threads(2)
        two = group_moments(x, 64)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    xp = F.pad(x, (0, 56)).double()
    assert torch.allclose(one[1].double(), xp[:, 64:128].T @ xp[:, 64:128] / 1500, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 5, 8, 9, 13, 20, 21, 33])
def test_fibonacci_search_finds_the_grid_minimum_of_unimodal_losses(n):
    """On any unimodal loss (here every position of the minimum, and plateaus of equal losses) the
    Fibonacci search picks exactly the full grid's point (the first of equal ones), evaluating
    each point at most once; without refine every point is evaluated."""
    for m in range(n):
        for plateau in (0, 1, 2):
            values = [max(abs(i - m) - plateau, 0) ** 1.5 + 0.1 * (i > m) * (abs(i - m) > plateau) for i in range(n)]
            calls = []
            best, losses = grid_argmin(n, lambda i: calls.append(i) or values[i], refine=True)
            assert best == min(range(n), key=values.__getitem__), (m, plateau)
            assert len(calls) == len(set(calls)) and all(losses[i] == values[i] for i in calls)
            if n == 20:
                assert len(calls) <= 7
            full_calls = []
            assert grid_argmin(n, lambda i: full_calls.append(i) or values[i], refine=False)[0] == best
            assert full_calls == list(range(n))


def test_sampling_tokens_in_place_equals_sampling_the_concatenation():
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(b, 7, 5, generator=gen) for b in (3, 1, 4)]
    flat = torch.cat([t.reshape(-1, 5) for t in inputs])
    for n in (0, 1, 5, 10, 55, 56, 57, 100):
        expected = flat[:: max(1, flat.shape[0] // max(n, 1))][:n]
        assert torch.equal(sample_tokens(inputs, n), expected), n


def test_channel_abs_mean_is_the_mean_over_every_token_however_the_windows_are_batched():
    gen = torch.Generator().manual_seed(1)
    windows = torch.randn(6, 9, 5, generator=gen) * torch.tensor([1e-3, 1.0, 30.0, 5.0, 1e3])
    batched = channel_abs_mean([windows[:2], windows[2:5], windows[5:]])
    assert torch.equal(batched, channel_abs_mean([w[None] for w in windows]))
    assert batched.dtype == torch.float32
    exact = windows.double().abs().reshape(-1, 5).mean(0)
    assert torch.allclose(batched.double(), exact, rtol=1e-6, atol=0)


def test_channel_abs_mean_does_not_depend_on_the_thread_count():
    inputs = [torch.randn(3, 700, 900, generator=torch.Generator().manual_seed(2)) * 7]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = channel_abs_mean(inputs)
        torch.set_num_threads(2)
        two = channel_abs_mean(inputs)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_awq_full_grid_is_the_reference_search():
    """--awq-full-grid scores every grid point (the reference's search); the Fibonacci search (the default) scores
    fewer and only ever picks a point it scored."""
    config = QuantConfig(method="awq", wbits=3, group_size=32)
    ctx = block_context("random-llada", config, dtype=torch.float32)
    group = ctx.family.group("gate_up")
    feats = ctx.group_inputs()[group.role]
    _, full = AWQ(QuantConfig(method="awq", wbits=3, group_size=32, awq_refine=False)).search_scale(ctx, group, feats)
    s, refined = AWQ(config).search_scale(ctx, group, feats)
    assert not any(math.isnan(v) for v in full) and sum(not math.isnan(v) for v in refined) <= 7
    for a, b in zip(full, refined):
        assert math.isnan(b) or a == b
    best = min((i for i, v in enumerate(refined) if not math.isnan(v)), key=refined.__getitem__)
    x_mean = channel_abs_mean(feats)
    assert torch.equal(s, candidate_scales(x_mean, None, best / 20))


@pytest.mark.parametrize("group_name", ["qkv", "gate_up", "down"])
def test_bfloat16_search_scores_the_float32_losses_closely(group_name):
    """The bfloat16 search ranks the same quantity: every grid point's loss within 1 % of the float32
    search's (through attention, the MLP, and the Gram matrix of down's inputs)."""
    losses = {}
    for dtype in ("model", "bfloat16"):
        config = QuantConfig(method="awq", wbits=3, group_size=32, awq_refine=False, awq_search_dtype=dtype)
        ctx = block_context("random-llada", config, dtype=torch.float32)
        group = ctx.family.group(group_name)
        losses[dtype] = AWQ(config).search_scale(ctx, group, ctx.group_inputs()[group.role])[1]
    exact, low = torch.tensor(losses["model"]), torch.tensor(losses["bfloat16"])
    assert torch.all((low - exact).abs() <= 0.01 * exact), (exact, low)


def test_search_precision_is_bfloat16_only_where_it_is_fast_and_precise_enough(monkeypatch):
    w32, w64 = torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.float64)
    w4, w8 = WeightSpec(4, 64, True), WeightSpec(8, 64, True)
    assert search_precision("model", w32, w4) is None
    assert search_precision("bfloat16", w64, w8) == torch.bfloat16
    for amx in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        assert search_precision("auto", w32, w4) == (torch.bfloat16 if amx else None)
        assert search_precision("auto", w64, w4) is None and search_precision("auto", w32, w8) is None


@pytest.mark.parametrize("n_tokens", [0, 30, 10_000])
def test_own_output_search_scores_on_every_token_or_on_an_even_sample(n_tokens):
    """down is scored on its own output: on every token through the Gram matrix (awq_linear_tokens 0, or
    more than there are), else on awq_linear_tokens tokens at an even stride; either way each grid
    point's loss is the mean squared output error over exactly those tokens."""
    config = QuantConfig(method="awq", wbits=3, group_size=32, awq_refine=False, awq_search_dtype="model",
                         awq_linear_tokens=n_tokens)
    ctx = block_context("random-llada", config, dtype=torch.float32)
    group = ctx.family.group("down")
    feats = ctx.group_inputs()[group.role]
    s, losses = AWQ(config).search_scale(ctx, group, feats)
    x = sample_tokens(feats, n_tokens) if 0 < n_tokens < 72 else torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
    assert x.shape[0] == (30 if n_tokens == 30 else 72)
    w = ctx.linear(group.linears[0]).weight.data.double()
    x_mean = channel_abs_mean(feats)
    for i, loss in enumerate(losses):
        c = candidate_scales(x_mean, None, i / 20)
        q = rtn_weight(w.float() * c, WeightSpec(3, 32, False)).weight.double() / c.double()
        expected = (x.double() @ (q - w).T).pow(2).mean().item()
        assert loss == pytest.approx(expected, rel=1e-4)
