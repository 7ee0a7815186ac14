"""The calibration pipeline: batching, early stopping and reuse change nothing but the time, and the
thread count does not change the codes."""
import pytest
import torch

from dllmq.models.random_models import random_model
from dllmq.quant import QuantConfig
from dllmq.models.family import Role
from dllmq.quant.block import BlockContext
from dllmq.quant.gptq_solver import HessianAccumulator
from dllmq.quant.pipeline import capture_block_inputs, quantize_model
from dllmq.quant.qlinear import QuantLinear

NSAMPLES, SEQLEN = 6, 32


def calib_ids(seed=0):
    return torch.randint(0, 250, (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(seed))


def context(name, batch_tokens, config=None):
    model, _ = random_model(name, seed=4)
    inputs, rope, mask = capture_block_inputs(model, calib_ids(), torch.device("cpu"), torch.device("cpu"),
                                              batch_tokens)
    block = model.get_blocks()[0]
    return BlockContext(block, 0, inputs, rope, mask, torch.device("cpu"), config or QuantConfig("gptq"))


def codes(model):
    return {n: (m.qweight.clone(), m.scales.clone(), m.qzeros.clone()) for n, m in model.named_modules()
            if isinstance(m, QuantLinear)}


def quantized_codes(name, config, **kwargs):
    model, _ = random_model(name, seed=4)
    quantize_model(model, config.make_method(), calib_ids(), progress=False, **kwargs)
    return codes(model)


def assert_same_codes(a, b):
    assert a.keys() == b.keys() and a
    for key in a:
        for x, y in zip(a[key], b[key]):
            assert torch.equal(x, y), key


@pytest.mark.parametrize("name", ["random-llada", "random-llama"])
def test_sequential_feeding_sees_what_a_full_pass_sees(name):
    """Stopping at each group's input and reusing the attention half's output give exactly the inputs
    the whole block's hooks see, and the same block outputs."""
    ctx = context(name, batch_tokens=4 * SEQLEN)
    full = ctx.group_inputs()
    outputs = ctx.run(keep_outputs=True)
    for group, feed in ctx.sequential():
        seen = []
        feed(seen.append)
        assert len(seen) == len(full[group.role])
        for a, b in zip(seen, full[group.role]):
            assert torch.equal(a, b), group.role
    for a, b in zip(ctx.outputs(), outputs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["random-llada", "random-llama"])
def test_batched_and_unbatched_hessians_are_identical(name):
    hessians = []
    for batch_tokens in (SEQLEN, 4 * SEQLEN, 100 * SEQLEN):   # one window per batch, batches of 4, all at once
        ctx = context(name, batch_tokens)
        assert len(ctx.inputs) == -(-NSAMPLES // max(1, batch_tokens // SEQLEN))
        found = {}
        for group, feed in ctx.sequential():
            acc = HessianAccumulator(ctx.linear(group.linears[0]).in_features, "cpu")
            feed(acc.add)
            found[group.role] = acc.H
        hessians.append(found)
    for other in hessians[1:]:
        for role, H in hessians[0].items():
            assert torch.equal(H, other[role]), role


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_batched_and_unbatched_calibration_give_identical_codes(method):
    config = QuantConfig(method, wbits=3, group_size=32, nsamples=NSAMPLES, seqlen=SEQLEN)
    one = quantized_codes("random-llama", config, batch_tokens=SEQLEN)
    many = quantized_codes("random-llama", config, batch_tokens=4 * SEQLEN)
    assert_same_codes(one, many)


@pytest.mark.parametrize("method,settings", [("gptq", {}), ("awq", {"awq_search_dtype": "model"}),
                                             ("awq", {"awq_search_dtype": "bfloat16"}),
                                             ("awq", {"awq_search_dtype": "bfloat16", "awq_linear_tokens": 32})])
def test_thread_count_does_not_change_the_codes(method, settings):
    config = QuantConfig(method, wbits=3, group_size=32, nsamples=NSAMPLES, seqlen=SEQLEN, **settings)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = quantized_codes("random-llada", config)
        torch.set_num_threads(2)
        two = quantized_codes("random-llada", config)
    finally:
        torch.set_num_threads(threads)
    assert_same_codes(one, two)


def test_hessian_chunks_do_not_depend_on_how_windows_arrive():
    x = torch.randn(5, 700, 24, generator=torch.Generator().manual_seed(0))
    a, b = HessianAccumulator(24, "cpu"), HessianAccumulator(24, "cpu")
    a.add(x)
    for w in x:
        b.add(w[None])
    assert torch.equal(a.H, b.H) and a.n == b.n == 3500
    reference = 2 * x.reshape(-1, 24).double().T @ x.reshape(-1, 24).double() / 3500
    assert torch.allclose(a.H.double(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["random-llada", "random-llama"])
@pytest.mark.parametrize("ahead", [False, True])
def test_kept_down_inputs_give_the_outputs_of_the_changed_block(name, ahead):
    """outputs() builds the block's outputs from the down projection's inputs kept during its feed:
    bit for bit what the whole block computes once every group has changed as GPTQ changes them
    (each group's weights replaced after its feed). A feed ahead (down fed before gate/up change)
    must not be reused: those inputs are stale."""
    ctx = context(name, batch_tokens=4 * SEQLEN)
    torch.manual_seed(1)
    for group, feed in ctx.sequential():
        if ahead and group.role == Role.MLP_IN:
            ctx.feed_ahead(ctx.family.group(Role.MLP_OUT), lambda x: None)
        if not (ahead and group.role == Role.MLP_OUT):
            feed(lambda x: None)
        for name_ in group.linears:
            w = ctx.linear(name_).weight
            w.data = w.data + 0.01 * torch.randn_like(w)
    kept = ctx.outputs()
    recomputed = ctx.run(keep_outputs=True)
    assert len(kept) == len(recomputed)
    for a, b in zip(kept, recomputed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n_in", [24, 100, 576, 1536])
@pytest.mark.parametrize("threads", [1, 2])
def test_triangular_hessian_equals_the_full_product_bit_for_bit(n_in, threads):
    """The accumulator computes only the lower triangle (row panels) and mirrors it; that is exactly the
    full chunked X^T X the solver used before (which is symmetric bit for bit), at any thread count.
    With token weights the lower triangle is the full weighted product's, and the result is symmetric."""
    gen = torch.Generator().manual_seed(n_in)
    x = torch.randn(3, 700, n_in, generator=gen) * torch.rand(n_in, generator=gen) * 5
    w = torch.rand(3, 700, generator=gen) + 0.5
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        full = torch.zeros(n_in, n_in)
        weighted = torch.zeros(n_in, n_in)
        for i in range(3):
            for k, c in enumerate(x[i].split(512)):
                full.addmm_(c.T, c)
                weighted.addmm_((c * w[i, k * 512:k * 512 + c.shape[0], None]).T, c)
        acc, acc_w = HessianAccumulator(n_in, "cpu"), HessianAccumulator(n_in, "cpu")
        acc.add(x)
        acc_w.add(x, w)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(full, full.T) and torch.equal(acc.S, full)
    assert torch.equal(acc_w.S.tril(), weighted.tril()) and torch.equal(acc_w.S, acc_w.S.T)
