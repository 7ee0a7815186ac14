"""GPTQ against the textbook Optimal Brain Quantizer, against RTN, and with act-order."""
import pytest
import torch

from dllmq.quant.gptq_solver import (HessianAccumulator, _all_group_grids, column_order, gptq_quantize, group_grid,
                                     relative_output_error)
from dllmq.quant.primitives import QuantSpec, compute_qparams, quantize_column
from dllmq.quant.qlinear import QuantLinear
from dllmq.quant.rounding import round_scales, rtn_weight
from dllmq.quant.specs import WeightSpec


def correlated_inputs(n_tokens=512, n_in=32, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(6, n_in, generator=gen, dtype=dtype)
    z = torch.randn(n_tokens, 6, generator=gen, dtype=dtype)
    return z @ basis + 0.1 * torch.randn(n_tokens, n_in, generator=gen, dtype=dtype)


def hessian(x):
    acc = HessianAccumulator(x.shape[1], "cpu", torch.float64)
    for chunk in x.split(100):
        acc.add(chunk)
    return acc.H


def textbook_obq(W, H, bits, group_size, damp):
    """Quantize columns left to right; after each, re-invert the Hessian of the columns still free and
    move them by the optimal-brain-surgeon update. O(n^4), obviously correct."""
    W = W.clone()
    n = W.shape[1]
    Hd = H.clone()
    Hd.diagonal().add_(damp * H.diagonal().mean())
    Q = torch.zeros_like(W)
    for j in range(n):
        if j % group_size == 0:
            s, z = compute_qparams(W[:, j:j + group_size], QuantSpec(bits=bits, granularity="channel"))
            s, z = round_scales(s.reshape(-1)), z.reshape(-1).float()
        Q[:, j] = quantize_column(W[:, j], s, z, bits)
        free = list(range(j, n))
        Hinv = torch.linalg.inv(Hd[free][:, free])
        err = (W[:, j] - Q[:, j]) / Hinv[0, 0]
        W[:, free] -= err[:, None] * Hinv[0][None, :]
    return Q


def test_gptq_equals_textbook_obq():
    x = correlated_inputs()
    H = hessian(x)
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    Q, scale, zero, g_idx = gptq_quantize(W, H, bits=3, group_size=8, blocksize=8, damp=0.01)
    reference = textbook_obq(W, H, bits=3, group_size=8, damp=0.01)
    assert g_idx is None and scale.shape == (8, 4)
    assert torch.allclose(Q, reference, atol=1e-9)


def test_lazy_blocks_do_not_change_the_result():
    x = correlated_inputs(n_in=64, seed=3)
    H = hessian(x)
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = gptq_quantize(W, H, bits=4, group_size=-1, blocksize=64)[0]
    b = gptq_quantize(W, H, bits=4, group_size=-1, blocksize=16)[0]
    assert torch.allclose(a, b, atol=1e-9)


def test_gptq_beats_rtn_on_correlated_inputs():
    x = correlated_inputs(n_in=64, seed=4)
    H = hessian(x)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for bits in (3, 4):
        q_gptq = gptq_quantize(W, H, bits=bits, group_size=32)[0]
        q_rtn = rtn_weight(W, WeightSpec(bits, 32, sym=False)).weight.double()
        e_gptq = (x @ (W - q_gptq).T).norm()
        e_rtn = (x @ (W - q_rtn).T).norm()
        assert e_gptq < 0.8 * e_rtn, (bits, e_gptq, e_rtn)
        assert abs(relative_output_error(W, q_gptq, H) - (e_gptq / (x @ W.T).norm()).item()) < 1e-9


def test_act_order_permutation_is_undone_exactly():
    x = correlated_inputs(n_in=32, seed=6) * torch.linspace(0.1, 3, 32, dtype=torch.float64)
    H = hessian(x)
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    perm = torch.argsort(H.diagonal(), descending=True)
    # dynamic groups: identical to GPTQ on the explicitly permuted problem, un-permuted
    Q, scale, zero, g_idx = gptq_quantize(W, H, bits=4, group_size=8, blocksize=8, act_order=True, static_groups=False)
    Qp = gptq_quantize(W[:, perm], H[perm][:, perm], bits=4, group_size=8, blocksize=8)[0]
    assert torch.allclose(Q, Qp[:, torch.argsort(perm)], atol=1e-12)
    assert g_idx is not None and torch.equal(g_idx[perm].long(), torch.arange(32) // 8)
    # the stored form reproduces it: codes + g_idx dequantize to exactly Q
    linear = torch.nn.Linear(32, 8, bias=False)
    linear.weight.data = Q.float()
    ql = QuantLinear.from_float(linear, scale, zero, 4, 8, g_idx=g_idx)
    assert torch.allclose(ql.dequantized_weight().double(), Q, atol=1e-6)
    # static groups keep the natural group order
    Qs, _, _, g_static = gptq_quantize(W, H, bits=4, group_size=8, blocksize=8, act_order=True, static_groups=True)
    assert g_static is None and (x @ (W - Qs).T).norm() < (x @ (W - rtn_weight(W, WeightSpec(4, 8, False)).weight.double()).T).norm()


def test_dead_inputs_get_zero_weights():
    x = correlated_inputs(n_in=16, seed=8)
    x[:, 3] = 0
    H = hessian(x)
    W = torch.randn(4, 16, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    Q = gptq_quantize(W, H, bits=4, group_size=-1)[0]
    assert torch.all(Q[:, 3] == 0)


def test_failed_cholesky_retries_with_more_damping(caplog):
    H = torch.zeros(8, 8, dtype=torch.float64)
    H[0, 0] = 1.0
    H[1, 1] = -5.0  # not positive definite: the first attempts must fail
    W = torch.randn(4, 8, dtype=torch.float64)
    gptq_quantize(W, H, bits=4, group_size=-1, damp=0.01)
    assert "retrying" in caplog.text


def textbook_obq_fixed_grids(W, H, bits, grids, group_size, damp, order):
    """The textbook quantizer in a given column order with every group's grid fixed in advance."""
    W = W.clone()
    Hd = H.clone()
    Hd.diagonal().add_(damp * H.diagonal().mean())
    Q = torch.zeros_like(W)
    free = list(order)
    for j in order:
        s, z = grids[j // group_size]
        Q[:, j] = quantize_column(W[:, j], s, z, bits)
        Hinv = torch.linalg.inv(Hd[free][:, free])
        err = (W[:, j] - Q[:, j]) / Hinv[0, 0]
        W[:, free] -= err[:, None] * Hinv[0][None, :]
        free.pop(0)
    return Q


def test_group_act_order_is_gptq_on_whole_permuted_groups():
    """Group-aware act-order: groups stay whole (g_idx is the natural one), ordered by their largest
    diag(H), columns by decreasing diag(H) inside each; identical to GPTQ on the permuted problem."""
    x = correlated_inputs(n_in=32, seed=6) * torch.linspace(3, 0.1, 32, dtype=torch.float64)[torch.randperm(
        32, generator=torch.Generator().manual_seed(0))]
    H = hessian(x)
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    Q, scale, zero, g_idx = gptq_quantize(W, H, bits=3, group_size=8, blocksize=8, group_act_order=True)
    perm = column_order(H.diagonal(), 8, act_order=False, group_act_order=True)
    assert sorted(perm.tolist()) == list(range(32)) and not torch.equal(perm, torch.arange(32))
    for k in range(4):   # whole groups, each sorted by decreasing diag
        block = perm[8 * k:8 * k + 8]
        assert len(set((block // 8).tolist())) == 1
        assert torch.all(H.diagonal()[block][:-1] >= H.diagonal()[block][1:])
    Qp, scale_p, _, _ = gptq_quantize(W[:, perm], H[perm][:, perm], bits=3, group_size=8, blocksize=8)
    assert g_idx is None and torch.allclose(Q, Qp[:, torch.argsort(perm)], atol=1e-12)
    groups_in_order = (perm[::8] // 8).tolist()
    assert torch.equal(scale[:, groups_in_order], scale_p)


def test_static_grids_equal_textbook_obq_with_fixed_grids():
    x = correlated_inputs(n_in=32, seed=8)
    H = hessian(x)
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for options in (dict(static_grids=True), dict(static_grids=True, group_act_order=True),
                    dict(static_grids=True, grid_search=True), dict(act_order=True, grid_search=True)):
        Q, scale, zero, _ = gptq_quantize(W, H, bits=3, group_size=8, blocksize=8, damp=0.01, **options)
        search = options.get("grid_search", False)
        grids = [group_grid(W[:, j:j + 8], 3, False, search) for j in range(0, 32, 8)]
        for k, (s, z) in enumerate(grids):   # every grid from the original weights
            assert torch.equal(scale[:, k], s) and torch.equal(zero[:, k], z)
        order = column_order(H.diagonal(), 8, options.get("act_order", False), options.get("group_act_order", False))
        order = list(range(32)) if order is None else order.tolist()
        reference = textbook_obq_fixed_grids(W, H, 3, grids, 8, 0.01, order)
        assert torch.allclose(Q, reference, atol=1e-9), options


def test_grid_search_never_rounds_a_group_worse():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(16, 32, generator=gen)
    w[3, 5] = 9.0   # an outlier makes the min/max grid coarse
    for bits, sym in ((3, True), (4, False)):
        plain = group_grid(w, bits, sym)
        searched = group_grid(w, bits, sym, search=True)
        def err(grid):
            s, z = grid
            q = (torch.round(w / s[:, None]) + z[:, None]).clamp(0, 2 ** bits - 1)
            return ((q - z[:, None]) * s[:, None] - w).abs().pow(2.4).sum(1)
        assert torch.all(err(searched) <= err(plain) + 1e-6)
        assert torch.any(err(searched) < err(plain) - 1e-6)


def planted_sink_model():
    """random-llama with an attention-sink-like token: every window starts with it, its embedding is
    large on two channels, and two MLP channels per block fire massively on it (a massive activation
    at the down projection's input, as SmolLM2 has)."""
    from dllmq.models.random_models import random_model

    model, _ = random_model("random-llama", seed=3)
    emb = model.get_embedding().weight.data
    emb[1] = 0.02 * torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(0))
    emb[1, 5], emb[1, 17] = 4.0, -3.0
    for block in model.get_blocks():
        for c in (7, 100):
            for linear in (block.mlp.gate_proj, block.mlp.up_proj):
                linear.weight.data[c] = 0
                linear.weight.data[c, 5], linear.weight.data[c, 17] = 2.4, -1.8
    return model


def test_gptq_beats_rtn_on_every_layer_with_a_planted_massive_token():
    """Held-out output error of every linear (on its inputs in the full-precision model), on the sink
    token and on the others: dllmq's GPTQ below round-to-nearest everywhere."""
    from dllmq.quant import QuantConfig
    from dllmq.quant.pipeline import quantize_model

    def windows(seed):
        ids = torch.randint(3, 250, (16, 64), generator=torch.Generator().manual_seed(seed))
        ids[:, 0] = 1
        return ids

    model = planted_sink_model()
    blocks = model.get_blocks()
    names = [(i, n) for i in range(len(blocks)) for n in model.family.block_linears]
    grams = {key: (HessianAccumulator(blocks[key[0]].get_submodule(key[1]).in_features, "cpu", torch.float64),
                   HessianAccumulator(blocks[key[0]].get_submodule(key[1]).in_features, "cpu", torch.float64))
             for key in names}

    def hook(key):
        def fn(m, args, out):
            grams[key][0].add(args[0][:, :1].double())
            grams[key][1].add(args[0][:, 1:].double())
        return fn
    handles = [blocks[i].get_submodule(n).register_forward_hook(hook((i, n))) for i, n in names]
    with torch.no_grad():
        model(windows(2))
    for h in handles:
        h.remove()
    errors = {}
    for method in ("rtn", "gptq"):
        quantized = planted_sink_model()
        config = QuantConfig(method, wbits=3, group_size=32, sym=True, nsamples=16, seqlen=64)
        quantize_model(quantized, config.make_method(), windows(1) if method == "gptq" else None, progress=False)
        for i, n in names:
            W = blocks[i].get_submodule(n).weight.double()
            D = W - quantized.get_blocks()[i].get_submodule(n).dequantized_weight().double()
            errors[method, i, n] = [float(((D @ g.S) * D).sum() / ((W @ g.S) * W).sum()) for g in grams[i, n]]
    for i, n in names:
        gptq, rtn = errors["gptq", i, n], errors["rtn", i, n]
        assert gptq[0] < rtn[0] and gptq[1] < rtn[1], (i, n, gptq, rtn)   # sink token, other tokens


@pytest.mark.parametrize("n_in, group", [(96, 32), (80, 32), (20, 32)])
@pytest.mark.parametrize("search", [False, True])
def test_all_group_grids_in_one_call_equal_one_call_per_group(n_in, group, search):
    """The static grids are computed for every whole group in one call: bit for bit the per-group grids
    (including a narrower last group)."""
    W = torch.randn(12, n_in, generator=torch.Generator().manual_seed(3)) * torch.rand(n_in) * 4
    grid = lambda w: group_grid(w, 3, True, search)   # noqa: E731
    together = _all_group_grids(W, group, grid)
    apart = [grid(W[:, j:j + group]) for j in range(0, n_in, group)]
    assert len(together) == len(apart)
    for (s1, z1), (s2, z2) in zip(together, apart):
        assert torch.equal(s1, s2) and torch.equal(z1, z2)


def textbook_grid_search(w, bits, sym, signed, points=20, min_shrink=0.5, norm=2.4):
    """The grid search as written first: each shrink factor's grid from the shrunk weights' own min/max."""
    spec = QuantSpec(bits=bits, symmetric=sym, granularity="channel", signed_grid=signed)
    maxq = 2 ** bits - 1
    best_err, best = None, None
    for i in range(points + 1):
        scale, zero = compute_qparams(w * (1 - (1 - min_shrink) * i / points), spec)
        scale, zero = round_scales(scale.reshape(-1)), zero.reshape(-1).float()
        q = ((torch.round(w / scale[:, None]) + zero[:, None]).clamp(0, maxq) - zero[:, None]) * scale[:, None]
        err = (w - q).abs().pow(norm).sum(1)
        if best is None:
            best_err, best = err, (scale, zero)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = (torch.where(better, scale, best[0]), torch.where(better, zero, best[1]))
    return best


@pytest.mark.parametrize("threads", [1, 2])
def test_grid_search_equals_the_textbook_search_at_any_thread_count(threads):
    """The search scans each row's range once and scales it (min(w c) = min(w) c in floats): bit for bit
    the per-factor min/max grids, on rows enough to be split across threads (zero and one-signed rows too)."""
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(2400, 64, generator=gen) * torch.rand(2400, 1, generator=gen)
    w[5], w[7], w[9] = 0, w[7].abs(), -w[9].abs()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for bits, sym, signed in ((3, True, False), (4, True, True), (4, False, False)):
            scale, zero = group_grid(w, bits, sym, search=True, signed=signed)
            ref_scale, ref_zero = textbook_grid_search(w, bits, sym, signed)
            assert torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero), (bits, sym, signed)
    finally:
        torch.set_num_threads(old)
