"""AWQ: folding scales is exact in full precision; the search never loses to alpha = 0."""
import pytest
import torch
import torch.nn.functional as F

from dllmq.models.random_models import random_model
from dllmq.quant.block import BlockContext
from dllmq.quant.config import QuantConfig
from dllmq.quant.methods.awq import AWQ, candidate_scales, clip_weight
from dllmq.quant.pipeline import capture_block_inputs
from dllmq.quant.rounding import rtn_weight
from dllmq.quant.smoothing import can_fold, fold_scales
from dllmq.quant.specs import WeightSpec


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
