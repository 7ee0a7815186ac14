"""Uniform quantization primitives against hand-computed values and slow textbook loops."""
import math

import pytest
import torch

from dllmq.errors import DllmqError
from dllmq.quant.primitives import (
    QuantSpec,
    compute_qparams,
    dequantize,
    expand_groups,
    fake_quantize,
    group_index,
    quantize,
    quantize_column,
)


def _slow_params(seg: torch.Tensor, spec: QuantSpec) -> tuple[float, float]:
    """Scale and zero of one reduction set, step by step as the study's code writes it."""
    maxq = 2**spec.bits - 1
    lo = min(float(seg.min()), 0.0) * spec.clip_ratio
    hi = max(float(seg.max()), 0.0) * spec.clip_ratio
    if spec.symmetric:
        m = max(-lo, hi)
        if m == 0:
            m = 1.0
        return 2 * m / maxq, float(2 ** (spec.bits - 1))
    if lo == 0 and hi == 0:
        lo, hi = -1.0, 1.0
    s = (hi - lo) / maxq
    return s, float(min(max(round(-lo / s), 0), maxq))


def _slow_fake_quant(seg: torch.Tensor, spec: QuantSpec) -> list[float]:
    """Element by element: q = clamp(round(x/s) + z, 0, 2^b - 1); x_hat = (q - z) * s."""
    s, z = _slow_params(seg, spec)
    out = []
    for v in seg.tolist():
        q = min(max(round(v / s) + z, 0), 2**spec.bits - 1)
        out.append((q - z) * s)
    return out


def _slow_reference(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Loop over the reduction sets of a 2-D tensor for any granularity."""
    rows, cols = x.shape
    out = torch.empty(rows, cols, dtype=torch.float64)
    if spec.granularity == "tensor":
        flat = _slow_fake_quant(x.flatten(), spec)
        return torch.tensor(flat, dtype=torch.float64).view(rows, cols)
    for r in range(rows):  # "channel" and "token" are one row each for a matrix
        step = spec.group_size if spec.granularity == "group" else cols
        for start in range(0, cols, step):
            seg = x[r, start : start + step]
            out[r, start : start + step] = torch.tensor(_slow_fake_quant(seg, spec))
    return out


def test_asymmetric_2bit_hand_example():
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    spec = QuantSpec(bits=2, symmetric=False, granularity="tensor")
    s, z = compute_qparams(x, spec)
    assert s.shape == (1,) and z.shape == (1,)
    assert s.item() == 1.0 and z.item() == 1.0  # s = (2 - (-1)) / 3, z = round(1 / 1)
    codes = quantize(x, s, z, 2)
    # round(0.5) is 0 (half to even), so 0.5 lands on code 1 with 0.0.
    assert codes.tolist() == [0, 1, 1, 3]
    assert dequantize(codes, s, z).tolist() == [-1.0, 0.0, 0.0, 2.0]


def test_symmetric_4bit_hand_example():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.4, 7.5])
    spec = QuantSpec(bits=4, symmetric=True, granularity="tensor")
    s, z = compute_qparams(x, spec)
    assert s.item() == 1.0 and z.item() == 8.0  # s = 2 * 7.5 / 15, z = 2^(4-1)
    codes = quantize(x, s, z, 4)
    assert codes.tolist() == [5, 7, 8, 8, 15]  # 7.5 -> round 8 + 8 = 16, clamped to 15
    assert fake_quantize(x, spec).tolist() == [-3.0, -1.0, 0.0, 0.0, 7.0]


def test_clip_ratio_hand_example():
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    spec = QuantSpec(bits=2, granularity="tensor", clip_ratio=0.5)
    s, z = compute_qparams(x, spec)
    assert s.item() == 0.5 and z.item() == 1.0  # range [-0.5, 1.0]
    assert quantize(x, s, z, 2).tolist() == [0, 1, 2, 3]
    assert fake_quantize(x, spec).tolist() == [-0.5, 0.0, 0.5, 1.0]  # ends are clipped


def test_clip_ratio_shrinks_scale_and_clips_extremes():
    x = torch.randn(4, 64)
    full = QuantSpec(bits=4, granularity="channel")
    clipped = QuantSpec(bits=4, granularity="channel", clip_ratio=0.8)
    s_full, _ = compute_qparams(x, full)
    s_clip, _ = compute_qparams(x, clipped)
    torch.testing.assert_close(s_clip, s_full * 0.8)
    assert fake_quantize(x, clipped).abs().amax(dim=1).le(x.abs().amax(dim=1)).all()


@pytest.mark.parametrize("symmetric", [False, True])
def test_study_formula_verbatim(symmetric):
    x = torch.tensor([-0.73, -0.2, 0.0, 0.11, 0.49, 1.3, -1.9, 0.05])
    spec = QuantSpec(bits=3, symmetric=symmetric, granularity="tensor")
    expected = torch.tensor(_slow_fake_quant(x, spec), dtype=torch.float32)
    torch.testing.assert_close(fake_quantize(x, spec), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
def test_error_bound_and_code_count(bits, symmetric):
    x = torch.randn(8, 96) * 3
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="group", group_size=32)
    s, z = compute_qparams(x, spec)
    s_el, z_el = expand_groups(s, 32, 96), expand_groups(z, 32, 96)
    codes = quantize(x, s_el, z_el, bits)
    assert codes.dtype == torch.uint8
    assert int(codes.max()) <= 2**bits - 1
    assert torch.unique(codes).numel() <= 2**bits
    err = (dequantize(codes, s_el, z_el) - x).abs()
    # With clip 1 every value is inside the grid's reach: error at most half a step
    # (plus float32 rounding of x itself, which matters at the top code of 8 bits).
    eps = torch.finfo(torch.float32).eps
    assert (err <= s_el / 2 + 4 * eps * x.abs()).all()
    # Zero is exactly representable.
    assert (dequantize(z_el.to(torch.uint8), s_el, z_el) == 0).all()


@pytest.mark.parametrize("granularity", ["tensor", "channel", "token", "group"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_granularities_match_slow_loop(granularity, symmetric):
    x = torch.randn(5, 24) * torch.linspace(0.1, 4, 5)[:, None]
    spec = QuantSpec(bits=3, symmetric=symmetric, granularity=granularity, group_size=8,
                     clip_ratio=0.9)
    got = fake_quantize(x, spec).double()
    torch.testing.assert_close(got, _slow_reference(x, spec), rtol=0, atol=1e-5)


def test_qparam_shapes():
    x = torch.randn(6, 20)
    shapes = {"tensor": (1, 1), "channel": (6, 1), "token": (6, 1), "group": (6, 3)}
    for gran, shape in shapes.items():
        s, z = compute_qparams(x, QuantSpec(bits=4, granularity=gran, group_size=8))
        assert s.shape == shape and z.shape == shape and s.dtype == torch.float32
    # Token granularity keeps leading dims of a [batch, seq, hidden] activation.
    s, _ = compute_qparams(torch.randn(2, 3, 16), QuantSpec(bits=8, granularity="token"))
    assert s.shape == (2, 3, 1)


def test_partial_last_group():
    x = torch.randn(3, 10)
    spec = QuantSpec(bits=4, granularity="group", group_size=4)  # groups of 4, 4, 2
    s, z = compute_qparams(x, spec)
    assert s.shape == (3, 3)
    assert group_index(10, 4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    # The last group's range comes from its 2 columns alone.
    s_last, _ = compute_qparams(x[:, 8:], QuantSpec(bits=4, granularity="token"))
    assert torch.equal(s[:, 2:], s_last)
    torch.testing.assert_close(fake_quantize(x, spec).double(), _slow_reference(x, spec),
                               rtol=0, atol=1e-6)
    assert math.ceil(576 / 128) == compute_qparams(
        torch.randn(2, 576), QuantSpec(bits=4, granularity="group", group_size=128)
    )[0].shape[1]


def test_constant_and_zero_rows_have_no_nan():
    x = torch.zeros(4, 8)
    x[1] = 2.5
    x[2] = -0.75
    for symmetric in (False, True):
        for bits in (2, 4, 8):
            spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="channel")
            s, z = compute_qparams(x, spec)
            assert (s > 0).all() and torch.isfinite(s).all()
            y = fake_quantize(x, spec)
            assert torch.isfinite(y).all()
            assert (y[0] == 0).all() and (y[3] == 0).all()
    # Asymmetric: a constant row maps onto itself exactly (it is an end of its range).
    y = fake_quantize(x, QuantSpec(bits=4, granularity="channel"))
    torch.testing.assert_close(y[1:3], x[1:3])


def test_dtype_preserved_and_params_float32():
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    spec = QuantSpec(bits=4, granularity="group", group_size=16)
    assert fake_quantize(x, spec).dtype == torch.bfloat16
    s, z = compute_qparams(x, spec)
    assert s.dtype == torch.float32 and z.dtype == torch.float32


def test_quantize_column_matches_channel_fake_quant():
    w = torch.randn(7, 5)
    spec = QuantSpec(bits=3, granularity="channel")
    s, z = compute_qparams(w, spec)
    cols = [quantize_column(w[:, j], s[:, 0], z[:, 0], 3) for j in range(5)]
    assert torch.equal(torch.stack(cols, dim=1), fake_quantize(w, spec))


def test_expand_groups():
    t = torch.tensor([[1.0, 2.0, 3.0]])
    assert expand_groups(t, 2, 5).tolist() == [[1.0, 1.0, 2.0, 2.0, 3.0]]
    with pytest.raises(DllmqError):
        expand_groups(t, 4, 5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bits=1),
        dict(bits=9),
        dict(bits=4.0),
        dict(bits=4, granularity="group"),
        dict(bits=4, granularity="group", group_size=0),
        dict(bits=4, granularity="group", group_size=-128),
        dict(bits=4, clip_ratio=0.0),
        dict(bits=4, clip_ratio=1.5),
        dict(bits=4, granularity="row"),
    ],
)
def test_invalid_specs_raise(kwargs):
    with pytest.raises(DllmqError):
        QuantSpec(**kwargs)


def test_channel_needs_a_matrix():
    with pytest.raises(DllmqError):
        compute_qparams(torch.randn(8), QuantSpec(bits=4, granularity="channel"))
