"""Bit packing (GPTQ layout) and QuantLinear against fake quantization and slow references."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dllmq.errors import DllmqError
from dllmq.quant.packing import pack_codes, packed_length, unpack_codes
from dllmq.quant.primitives import (
    QuantSpec,
    compute_qparams,
    dequantize,
    expand_groups,
    group_index,
    quantize,
)
from dllmq.quant.qlinear import QuantLinear

# --- packing --------------------------------------------------------------------------------


def _u32(t: torch.Tensor) -> list[int]:
    return [v & 0xFFFFFFFF for v in t.tolist()]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("length", [1, 31, 33, 75])
def test_pack_round_trip(bits, length):
    codes = torch.randint(0, 2**bits, (length, 6), dtype=torch.uint8)
    packed = pack_codes(codes, bits, dim=0)
    assert packed.dtype == torch.int32
    assert packed.shape == (math.ceil(length * bits / 32), 6) == (packed_length(length, bits), 6)
    assert torch.equal(unpack_codes(packed, bits, length, dim=0), codes)
    # Along the last dim too, with a 3-D tensor.
    c3 = codes.T.reshape(2, 3, length)
    p3 = pack_codes(c3, bits, dim=-1)
    assert p3.shape == (2, 3, packed_length(length, bits))
    assert torch.equal(unpack_codes(p3, bits, length, dim=-1), c3)


def test_pack_4bit_hand_example():
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
    packed = pack_codes(codes, 4, dim=0)
    assert _u32(packed) == [0x87654321]
    # The top nibble set makes the word negative as int32: the bit pattern is what counts.
    assert packed.item() == 0x87654321 - 2**32


def test_pack_3bit_hand_example():
    codes = torch.arange(11) % 8  # 0..7, 0, 1, 2
    packed = pack_codes(codes, 3, dim=0)
    assert packed.shape == (2,)  # ceil(33 / 32)
    first = sum(int(c) << (3 * j) for j, c in enumerate(codes[:10]))
    first |= (int(codes[10]) & 0b11) << 30  # low 2 bits of code 10
    second = int(codes[10]) >> 2  # its high bit opens word 1
    assert _u32(packed) == [first, second]
    # 32 codes fill exactly 3 words, GPTQ's 3-bit layout.
    assert pack_codes(torch.randint(0, 8, (32,)), 3, dim=0).shape == (3,)


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(DllmqError):
        pack_codes(torch.tensor([0, 4]), 2)
    with pytest.raises(DllmqError):
        pack_codes(torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(DllmqError):
        unpack_codes(torch.zeros(3, dtype=torch.int32), 4, length=8)


def test_pack_chunks_over_rows(monkeypatch):
    import dllmq.quant.packing as packing

    monkeypatch.setattr(packing, "_CHUNK_ELEMENTS", 64)  # force many small chunks
    codes = torch.randint(0, 8, (40, 70), dtype=torch.uint8)
    packed = pack_codes(codes, 3, dim=1)
    monkeypatch.setattr(packing, "_CHUNK_ELEMENTS", 1 << 20)
    assert torch.equal(packed, pack_codes(codes, 3, dim=1))
    monkeypatch.setattr(packing, "_CHUNK_ELEMENTS", 64)
    assert torch.equal(unpack_codes(packed, 3, 70, dim=1), codes)


# --- QuantLinear ----------------------------------------------------------------------------


def _linear(in_f: int, out_f: int, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.2, 3.0, out_f)[:, None])
    return lin


def _params(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False):
    gs = w.shape[1] if group_size == -1 else group_size
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="group", group_size=gs)
    return compute_qparams(w, spec)


def _fake_quant_fp16_scales(w, scale, zero, bits, group_size):
    """Fake quantization on the grid the module stores: scales rounded to fp16 first."""
    gs = w.shape[1] if group_size == -1 else group_size
    s = expand_groups(scale.half().float(), gs, w.shape[1])
    z = expand_groups(zero, gs, w.shape[1])
    return dequantize(quantize(w, s, z, bits), s, z)


@pytest.mark.parametrize(
    "bits,group_size,in_f,symmetric",
    [(4, 32, 96, False), (3, 32, 96, False), (2, 16, 48, True), (8, 64, 128, True),
     (4, -1, 80, False), (4, 128, 576, False)],
)
def test_from_float_matches_fake_quant(bits, group_size, in_f, symmetric):
    lin = _linear(in_f, 24)
    scale, zero = _params(lin.weight.detach(), bits, group_size, symmetric)
    ql = QuantLinear.from_float(lin, scale, zero, bits, group_size)
    expected = _fake_quant_fp16_scales(lin.weight.detach(), scale, zero, bits, group_size)
    got = ql.dequantized_weight()
    assert got.shape == (24, in_f) and got.dtype == torch.float32
    assert torch.equal(got, expected)
    n_groups = 1 if group_size == -1 else math.ceil(in_f / group_size)
    assert ql.qweight.shape == (packed_length(in_f, bits), 24)
    assert ql.qzeros.shape == (n_groups, packed_length(24, bits))
    assert ql.scales.shape == (n_groups, 24) and ql.scales.dtype == torch.float16
    assert ql.g_idx.dtype == torch.int32 and ql.g_idx.shape == (in_f,)


def test_zeros_stored_as_true_zero_points():
    lin = _linear(64, 16)
    scale, zero = _params(lin.weight.detach(), 4, 32)
    ql = QuantLinear.from_float(lin, scale, zero, 4, 32)
    stored = unpack_codes(ql.qzeros, 4, 16, dim=1)
    assert torch.equal(stored.float(), zero.t())  # gptq_v2: no -1 offset


def test_forward_equals_linear_with_dequantized_weight():
    lin = _linear(64, 32)
    scale, zero = _params(lin.weight.detach(), 4, 16)
    ql = QuantLinear.from_float(lin, scale, zero, 4, 16)
    x = torch.randn(2, 5, 64)
    assert torch.equal(ql(x), F.linear(x, ql.dequantized_weight(), lin.bias.detach()))
    # Close to the float layer (4-bit, group 16), and follows the input's dtype.
    torch.testing.assert_close(ql(x), lin(x).detach(), rtol=0.2, atol=0.2)
    assert ql(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_kept_dequantized_weights_give_the_same_outputs_and_are_freed(monkeypatch):
    from dllmq.quant.qlinear import dense_weight_bytes, keep_dequantized_weights
    model = nn.Sequential(*(QuantLinear.from_float(lin, *_params(lin.weight.detach(), 4, 16), 4, 16)
                            for lin in (_linear(64, 32), _linear(32, 64))))
    x = torch.randn(3, 64)
    ref = model(x)
    calls = []
    original = QuantLinear.dequantized_weight
    monkeypatch.setattr(QuantLinear, "dequantized_weight", lambda self: calls.append(self) or original(self))
    with keep_dequantized_weights(model):
        outs = [model(x) for _ in range(4)] + [model(x.double()).float()]
    assert all(torch.equal(o, ref) for o in outs[:4]) and torch.allclose(outs[4], ref, atol=1e-5)
    assert len(calls) == 2 + 2  # once per layer, once more per layer for the new dtype
    assert all(m._kept_weight is None and not m._keep_weight for m in model)
    model(x)
    assert len(calls) == 6  # outside the block: dequantized on every forward again
    assert dense_weight_bytes(model) == (64 * 32 + 32 * 64) * 4
    with keep_dequantized_weights(model, max_bytes=dense_weight_bytes(model) - 1):  # too big: nothing kept
        model(x)
        assert all(m._kept_weight is None for m in model)
    with keep_dequantized_weights(model):
        model(x)
        assert all(m._kept_weight is not None for m in model)
        with keep_dequantized_weights(model):  # nested (an evaluation inside a study cell): the outer one owns them
            pass
        assert all(m._kept_weight is not None and m._keep_weight for m in model)
    assert all(m._kept_weight is None for m in model)


def test_forward_applies_transform_then_act_quantizer():
    lin = _linear(16, 8, bias=False)
    scale, zero = _params(lin.weight.detach(), 8, -1)
    ql = QuantLinear.from_float(lin, scale, zero, 8, -1)
    assert ql.input_transform is None and ql.act_quantizer is None
    calls = []

    class Tag(nn.Module):
        def __init__(self, name, fn):
            super().__init__()
            self.name, self.fn = name, fn

        def forward(self, x):
            calls.append(self.name)
            return self.fn(x)

    ql.input_transform = Tag("transform", lambda x: x * 2)
    ql.act_quantizer = Tag("act", lambda x: x + 1)
    x = torch.randn(3, 16)
    out = ql(x)
    assert calls == ["transform", "act"]
    torch.testing.assert_close(out, F.linear(x * 2 + 1, ql.dequantized_weight()))


@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_round_trip(bias):
    lin = _linear(576, 40, bias=bias)
    scale, zero = _params(lin.weight.detach(), 3, 128)
    ql = QuantLinear.from_float(lin, scale, zero, 3, 128)
    sd = ql.state_dict()
    expected_keys = {"qweight", "qzeros", "scales", "g_idx"} | ({"bias"} if bias else set())
    assert set(sd) == expected_keys
    fresh = QuantLinear.empty(576, 40, 3, 128, bias=bias, scale_dtype=torch.float16)
    fresh.load_state_dict(sd)
    x = torch.randn(4, 576)
    assert torch.equal(fresh(x), ql(x))
    # A float32 bias (nn.Linear's) is adopted as saved, not rounded to the empty module's fp16.
    if bias:
        assert fresh.bias.dtype == torch.float32


def test_act_order_g_idx_against_slow_reference():
    in_f, out_f, bits, gs = 64, 6, 4, 16
    lin = _linear(in_f, out_f, bias=False)
    w = lin.weight.detach()
    perm = torch.randperm(in_f)
    # Groups are formed over the permuted order: column perm[k] belongs to group k // gs.
    g_idx = torch.empty(in_f, dtype=torch.int32)
    g_idx[perm] = group_index(in_f, gs).to(torch.int32)
    assert not bool((g_idx[1:] >= g_idx[:-1]).all())  # really not monotonic
    scale, zero = _params(w[:, perm], bits, gs)
    ql = QuantLinear.from_float(lin, scale, zero, bits, gs, g_idx=g_idx)
    assert torch.equal(ql.g_idx, g_idx)

    s16 = scale.half().float()
    slow = torch.empty(out_f, in_f)
    for o in range(out_f):
        for i in range(in_f):
            s, z = s16[o, g_idx[i]], zero[o, g_idx[i]]
            q = torch.clamp(torch.round(w[o, i] / s) + z, 0, 2**bits - 1)
            slow[o, i] = (q - z) * s
    assert torch.equal(ql.dequantized_weight(), slow)


def test_per_channel_group_size_minus_one_equals_in_features():
    lin = _linear(48, 12)
    scale, zero = _params(lin.weight.detach(), 4, -1)
    assert scale.shape == (12, 1)
    a = QuantLinear.from_float(lin, scale, zero, 4, -1)
    b = QuantLinear.from_float(lin, scale, zero, 4, 48)
    assert a.n_groups == b.n_groups == 1
    assert torch.equal(a.g_idx, torch.zeros(48, dtype=torch.int32))
    assert torch.equal(a.dequantized_weight(), b.dequantized_weight())


def test_partial_last_group_576():
    lin = _linear(576, 16)
    scale, zero = _params(lin.weight.detach(), 4, 128)
    assert scale.shape == (16, 5)
    ql = QuantLinear.from_float(lin, scale, zero, 4, 128)
    assert ql.g_idx[-64:].eq(4).all() and ql.g_idx[-65].item() == 3
    # The last 64 columns use their own range: error within half of their step.
    err = (ql.dequantized_weight() - lin.weight.detach())[:, 512:].abs()
    assert (err <= ql.scales[4].float()[:, None] / 2 * (1 + 1e-3)).all()


def test_tiny_scales_do_not_vanish_in_fp16():
    lin = nn.Linear(32, 4, bias=False)
    with torch.no_grad():
        lin.weight.mul_(1e-9)  # a scale below fp16's smallest subnormal
    scale, zero = _params(lin.weight.detach(), 4, -1)
    ql = QuantLinear.from_float(lin, scale, zero, 4, -1)
    w = ql.dequantized_weight()
    assert (ql.scales > 0).all() and torch.isfinite(w).all()


@pytest.mark.parametrize("bits,in_f,out_f,gs", [(4, 1024, 512, 128), (3, 576, 320, 128),
                                                (2, 512, 256, 64), (8, 256, 256, -1)])
def test_storage_bytes(bits, in_f, out_f, gs):
    lin = _linear(in_f, out_f, bias=False)
    scale, zero = _params(lin.weight.detach(), bits, gs)
    ql = QuantLinear.from_float(lin, scale, zero, bits, gs)
    n_groups = scale.shape[1]
    ideal = in_f * out_f * bits / 8 + n_groups * out_f * (2 + bits / 8) + in_f * 4
    actual = sum(ql.state_dict()[k].numel() * ql.state_dict()[k].element_size()
                 for k in ("qweight", "qzeros", "scales", "g_idx"))
    assert actual == ql.storage_bytes()
    assert abs(actual - ideal) / ideal < 0.02


def test_from_float_validates_inputs():
    lin = _linear(64, 8)
    scale, zero = _params(lin.weight.detach(), 4, 32)
    with pytest.raises(DllmqError):  # shape for group 16 is [8, 4], not [8, 2]
        QuantLinear.from_float(lin, scale, zero, 4, 16)
    with pytest.raises(DllmqError):
        QuantLinear.from_float(lin, scale, zero + 16, 4, 32)
    with pytest.raises(DllmqError):
        QuantLinear.from_float(lin, scale, zero, 9, 32)
    with pytest.raises(DllmqError):
        QuantLinear.from_float(lin, scale, zero, 4, 32, g_idx=torch.full((64,), 2))
    with pytest.raises(DllmqError):
        QuantLinear.empty(64, 8, 4, 0)
