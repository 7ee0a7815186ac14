"""The faster weight-activation evaluation path computes the same bits as the straightforward one.

Each fast piece is compared with torch.equal (not allclose) against its plain statement (quant/plain_paths.py):
the per-token activation quantizer, the Hadamard butterflies, DuQuant's rotation, the prepared input
shared by linears reading one tensor; and end to end, dllmq-tiny's logits under SmoothQuant / QuaRot /
DuQuant at W8A8 and W4A4 and RTN W4A4-mxfp4, the fast path against all the plain ones at once.
"""
import pytest
import torch
from torch import nn

import dllmq.quant.activations as activations
import dllmq.quant.hadamard as hadamard
from dllmq.models.loading import load_plain_model
from dllmq.quant import QuantConfig, quantize
from dllmq.quant.activations import ActQuantizer, fake_quantize_tokens
from dllmq.quant.methods.duquant import DuQuantTransform
from dllmq.quant.online import OnlineLinear
from dllmq.quant.plain_paths import plain_duquant_orthogonal, plain_hadamard, plain_paths
from dllmq.quant.primitives import QuantSpec, fake_quantize
from dllmq.quant.qlinear import keep_dequantized_weights


def _activations(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, 96, generator=gen) * torch.logspace(-3, 2, 96)   # wide per-channel ranges
    x[0, 0] = 0.0                                                            # an all-zero token
    x[0, 1] = x[0, 1].abs()                                                  # no negative value
    x[0, 2] = -x[0, 2].abs()                                                 # no positive value
    x[1, 3, :5] = 1e30                                                       # a huge outlier
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True, "signed"])
@pytest.mark.parametrize("clip", [1.0, 0.9])
def test_token_quantizer_is_bitwise_the_reference(dtype, bits, symmetric, clip):
    x = _activations(torch.float32 if dtype == torch.float16 else dtype)
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4).to(dtype)
    spec = QuantSpec(bits=bits, symmetric=bool(symmetric), granularity="token", clip_ratio=clip,
                     signed_grid=symmetric == "signed")   # QuaRot's grid (its paper profile)
    before = x.clone()
    fast = fake_quantize_tokens(x, spec)
    assert fast.dtype == x.dtype and torch.equal(x, before)                 # input untouched
    assert torch.equal(fast, fake_quantize(x, spec))


@pytest.mark.parametrize("n", [1, 2, 4, 12, 28, 64, 148, 384, 576])
def test_fast_hadamard_is_bitwise_the_plain_butterflies(n):
    for x in (torch.randn(3, 5, n), torch.randn(n, 7).T, torch.randn(n, dtype=torch.float64)):
        before = x.clone()
        for scale in (None, 0.5):
            assert torch.equal(hadamard._fast_hadamard(x, scale), plain_hadamard(x, scale))
        assert torch.equal(x, before)


@pytest.mark.parametrize("n, block", [(96, 32), (100, 32), (20, 32)])
def test_duquant_rotation_is_bitwise_the_plain_one(n, block):
    gen = torch.Generator().manual_seed(1)
    calib = torch.randn(64, n, generator=gen) * torch.linspace(0.1, 5, n)
    t = DuQuantTransform.fit(calib, torch.rand(n, generator=gen) + 0.5, block, steps=4)
    x = torch.randn(2, 7, n, generator=gen)
    assert torch.equal(t.orthogonal(x), plain_duquant_orthogonal(t, x))
    with torch.no_grad():  # a reloaded rotation is seen, not the cached stack of the old one
        t.r1_0.copy_(torch.linalg.qr(torch.randn(t.r1_0.shape, generator=gen))[0])
    assert torch.equal(t.orthogonal(x), plain_duquant_orthogonal(t, x))


def _linear(quantizer, transform=None, seed=0):
    lin = OnlineLinear(16, 8)
    nn.init.normal_(lin.weight, generator=torch.Generator().manual_seed(seed))
    lin.act_quantizer, lin.input_transform = quantizer, transform
    return lin


def test_linears_reading_one_input_share_it_only_when_equal(monkeypatch):
    calls = []
    real = activations.fake_quantize_tokens
    monkeypatch.setattr(activations, "fake_quantize_tokens", lambda x, spec: calls.append(1) or real(x, spec))
    q, k = _linear(ActQuantizer(4), seed=1), _linear(ActQuantizer(4), seed=2)
    other = _linear(ActQuantizer(4, symmetric=True), seed=3)
    x = torch.randn(3, 16)
    outs = [q(x), k(x)]
    assert len(calls) == 1                                              # equal quantizers: quantized once
    assert torch.equal(outs[1], nn.functional.linear(fake_quantize(x, ActQuantizer(4).spec), k.weight))
    other(x)
    assert len(calls) == 2                                              # other settings: its own
    x.mul_(2.0)                                                         # changed in place: not reused
    assert torch.equal(q(x), nn.functional.linear(fake_quantize(x, ActQuantizer(4).spec), q.weight))
    assert len(calls) == 3
    y = x.clone()                                                       # an equal but new tensor
    q(y)
    assert len(calls) == 4


def test_static_quantizers_are_never_shared():
    a, b = ActQuantizer(8, static=True), ActQuantizer(8, static=True)
    a.calibrate(torch.full((2, 16), 1.0))
    b.calibrate(torch.full((2, 16), 4.0))
    la, lb = _linear(a, seed=1), _linear(b, seed=1)
    x = torch.linspace(-3, 3, 32).reshape(2, 16)
    assert not torch.equal(la(x), lb(x))
    assert torch.equal(lb(x), nn.functional.linear(b(x), lb.weight))


CONFIGS = {
    "smoothquant-W8A8": ("smoothquant", dict(wbits=8, abits=8)),
    "smoothquant-W4A4": ("smoothquant", dict(wbits=4, abits=4)),
    "smoothquant-W4A4-study-grid": ("smoothquant", dict(wbits=4, abits=4, study_grid=True)),   # its paper grid
    "quarot-W8A8": ("quarot", dict(wbits=8, abits=8, weight_method="rtn")),
    "quarot-W4A4": ("quarot", dict(wbits=4, abits=4, weight_method="rtn")),
    "quarot-W4A4-paper-grid": ("quarot", dict(wbits=4, abits=4, weight_method="rtn", signed_grid=True,
                                              cross_head=True, kv_per_token=True)),
    "duquant-W8A8": ("duquant", dict(wbits=8, abits=8)),
    "duquant-W4A4": ("duquant", dict(wbits=4, abits=4)),
    "rtn-W4A4-mxfp4": ("rtn", dict(wbits=4, abits=4, wformat="mxfp4", aformat="mxfp4")),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tiny_model_logits_are_bitwise_the_plain_paths(name):
    method, kw = CONFIGS[name]
    lm = load_plain_model("dllmq-tiny")
    quantize(lm.model, lm.tokenizer, QuantConfig(method, **kw, nsamples=4, seqlen=64), progress=False)
    ids = torch.randint(0, lm.model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), keep_dequantized_weights(lm.model):
        fast = lm.model(ids)
        with plain_paths():
            slow = lm.model(ids)
    assert torch.equal(fast, slow)
