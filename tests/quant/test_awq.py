"""AWQ: folding scales is exact in full precision; the search never loses to alpha = 0."""
import math

import pytest
import torch
import torch.nn.functional as F

from dllmq.models.random_models import random_model
from dllmq.quant.block import BlockContext
from dllmq.quant.config import QuantConfig
from dllmq.quant.methods.awq import AWQ, candidate_scales, clip_weight, grid_argmin
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
    config = QuantConfig(method="awq", wbits=3, group_size=32)
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


@pytest.mark.parametrize("n", [1, 5, 8, 9, 13, 20, 21, 33])
def test_coarse_to_fine_search_finds_the_grid_minimum_of_unimodal_losses(n):
    """On any unimodal loss (here every position of the minimum, and plateaus of equal losses) the
    coarse-to-fine search picks exactly the full grid's point (the first of equal ones), evaluating
    each point at most once; without refine every point is evaluated."""
    for m in range(n):
        for plateau in (0, 1, 2):
            values = [max(abs(i - m) - plateau, 0) ** 1.5 + 0.1 * (i > m) * (abs(i - m) > plateau) for i in range(n)]
            calls = []
            best, losses = grid_argmin(n, lambda i: calls.append(i) or values[i], refine=True)
            assert best == min(range(n), key=values.__getitem__), (m, plateau)
            assert len(calls) == len(set(calls)) and all(losses[i] == values[i] for i in calls)
            if n == 20:
                assert len(calls) <= 9
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
    """--awq-full-grid scores every grid point (the reference's search); the coarse-to-fine default scores
    fewer and only ever picks a point it scored."""
    config = QuantConfig(method="awq", wbits=3, group_size=32)
    ctx = block_context("random-llada", config, dtype=torch.float32)
    group = ctx.family.group("gate_up")
    feats = ctx.group_inputs()[group.role]
    _, full = AWQ(QuantConfig(method="awq", wbits=3, group_size=32, awq_refine=False)).search_scale(ctx, group, feats)
    s, refined = AWQ(config).search_scale(ctx, group, feats)
    assert not any(math.isnan(v) for v in full) and sum(not math.isnan(v) for v in refined) <= 9
    for a, b in zip(full, refined):
        assert math.isnan(b) or a == b
    best = min((i for i, v in enumerate(refined) if not math.isnan(v)), key=refined.__getitem__)
    x_mean = channel_abs_mean(feats)
    assert torch.equal(s, candidate_scales(x_mean, None, best / 20))
