"""docs/fidelity.md items 5 and 6: under --profile paper, SmoothQuant's and DuQuant's linears quantize their
weights and activations on the study's grid (DuQuant/quantize/quantizer.py, UniformAffineQuantizer), re-stated
here from reading it; dllmq's profile keeps its own grid."""
from __future__ import annotations

import pytest
import torch

from dllmq.quant import QuantConfig
from dllmq.quant.activations import ActQuantizer, QKVQuantizer, study_token_fake_quantize
from dllmq.quant.primitives import QuantSpec, fake_quantize
from dllmq.quant.rounding import rtn_weight
from dllmq.quant.specs import WeightSpec

W4A4 = dict(wbits=4, abits=4, group_size=-1)
CLIPMIN, CLIPMAX = 1e-5, 1e4   # quantize/const.py


def study_calibration(x, n_bits, swc=None, lac=None):
    """per_token_dynamic_calibration (symmetric False, no group, no lwc), over the last dim: xmin / xmax not
    widened, swc taking precedence over lac (its elif chain), scale clamped, zero clamped then rounded."""
    xmin, xmax = x.amin([-1], keepdim=True), x.amax([-1], keepdim=True)
    if swc:
        xmax, xmin = swc * xmax, swc * xmin
    elif lac:
        xmax, xmin = lac * xmax, lac * xmin
    scale = ((xmax - xmin) / (2 ** n_bits - 1)).clamp(min=CLIPMIN, max=CLIPMAX)
    zero_point = -xmin / scale
    return scale, zero_point.clamp(min=-CLIPMAX, max=CLIPMAX).round()


def study_fake_quant(x, scale, round_zero_point, n_bits):
    """fake_quant: round(x.float() / scale) held in float16, plus the zero, clamped to [0, 2^b - 1], back."""
    x_int = torch.round(x.float() / scale).half()
    x_int = x_int.add(round_zero_point).clamp(0, 2 ** n_bits - 1)
    return x_int.sub(round_zero_point).mul(scale)


def study_quantizer(x, n_bits, swc=None, lac=None):
    scale, zero = study_calibration(x, n_bits, swc, lac)
    return study_fake_quant(x, scale, zero, n_bits)


def _activations(bits=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 96, generator=g) * 2 + 0.3
    x[1, 5] = 80.0                                          # an outlier
    x[2] = x[2].abs() + 3                                    # one sign: zero point below 0
    x[3] = -x[3].abs() - 3                                   # one sign: zero point above 2^b - 1
    x[4] = 0.0                                               # all zero: scale at CLIPMIN
    x[5] = 1.5                                               # constant: scale at CLIPMIN, zero clamped at -CLIPMAX
    # round(x / s) ~ 3000 (4 bits) / ~5000 (8 bits), |zero| below its 1e4 clamp: float16 rounds it
    x[6] = (100 if bits == 4 else 10) + torch.linspace(0, 0.5, 96)
    x[7] = 1000 + torch.linspace(0, 1e-2, 96)                # round(x / s) beyond float16's range
    return x


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("clip", [1.0, 0.9])
def test_token_grid_is_the_studys_quantizer(bits, clip):
    x = _activations(bits)
    want = study_quantizer(x, bits, lac=clip if clip != 1.0 else None)
    spec = QuantSpec(bits=bits, granularity="token", clip_ratio=clip, study_grid=True)
    assert torch.equal(fake_quantize(x, spec), want)
    assert torch.equal(ActQuantizer(bits, clip_ratio=clip, study_grid=True)(x), want)
    assert torch.equal(study_token_fake_quantize(x, bits, clip), want)   # the Q/K/V path: the same code
    if clip == 1.0:   # the float16 step matters on row 6
        scale, zero = study_calibration(x, bits)
        float32_codes = ((torch.round(x / scale) + zero).clamp(0, 2 ** bits - 1) - zero) * scale
        assert not torch.equal(float32_codes[6], want[6])
    assert not torch.equal(ActQuantizer(bits, clip_ratio=clip)(x), want)   # dllmq's grid: zero in the range


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("swc", [None, 0.8])
def test_weight_grid_is_the_studys_per_channel_quantizer(bits, swc):
    """weight_quant_params: per_channel (one grid per output row), asymmetric, swc 0.8 under DuQuant."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 160, generator=g) * 0.05
    w[3, 7] = 1.0
    clip = swc or 1.0
    want = study_quantizer(w, bits, swc=swc)
    assert torch.equal(fake_quantize(w, QuantSpec(bits=bits, granularity="channel", clip_ratio=clip,
                                                  study_grid=True)), want)
    # rtn_weight stores float16 scales and codes against them (docs/fidelity.md 11 d): the study's zero point,
    # its codes against the stored scale
    scale, zero = study_calibration(w, bits, swc=swc)
    stored = study_fake_quant(w, scale.half().float(), zero, bits)
    got = rtn_weight(w, WeightSpec(bits=bits, group_size=-1, clip=clip, study_grid=True))
    assert torch.equal(got.weight, stored)
    assert torch.equal(got.zero, zero)
    # rows holding both signs (all of these): dllmq's grid widens nothing, so the two grids coincide
    assert torch.equal(rtn_weight(w, WeightSpec(bits=bits, group_size=-1, clip=clip)).weight, got.weight)


def test_weight_groups_on_the_study_grid_ignore_the_padding():
    """A group size that does not divide the row: the last, short group's range is its own entries' (the
    study's code pads with zeros only on its symmetric grid)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 160, generator=g) + 2.0               # mostly positive: a zero pad would widen the range
    got = fake_quantize(w, QuantSpec(bits=4, granularity="group", group_size=128, study_grid=True))
    want = torch.cat([study_quantizer(w[:, :128], 4), study_quantizer(w[:, 128:], 4)], dim=1)
    assert torch.equal(got, want)


def test_a_weight_row_of_one_sign_falls_back_to_a_storable_grid():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 64, generator=g)
    w[2] = w[2].abs() + 0.5
    got = rtn_weight(w, WeightSpec(bits=4, group_size=-1, study_grid=True))
    assert 0 <= got.zero.min() and got.zero.max() <= 15
    dllmq_row = rtn_weight(w[2:3], WeightSpec(bits=4, group_size=-1)).weight
    assert torch.equal(got.weight[2:3], dllmq_row)
    others = [0, 1, 3, 4, 5]
    scale, zero = study_calibration(w[others], 4)
    assert torch.equal(got.weight[others], study_fake_quant(w[others], scale.half().float(), zero, 4))


def test_study_grid_is_asymmetric_only():
    from dllmq.errors import DllmqError
    with pytest.raises(DllmqError, match="asymmetric"):
        QuantSpec(bits=4, symmetric=True, study_grid=True)


# -- the paper profile sets it; dllmq's profile, saved configs and study keys stay as they were ------------------
@pytest.mark.parametrize("method", ["smoothquant", "duquant"])
def test_paper_profile_sets_the_study_grid_and_dllmq_does_not(method):
    paper = QuantConfig(method, profile="paper", **W4A4).for_family("llada")
    plain = QuantConfig(method, **W4A4)
    assert paper.settings.study_grid and paper.to_dict()["study_grid"] is True
    assert not plain.settings.study_grid and "study_grid" not in plain.to_dict()
    assert "study_grid" not in QuantConfig(method, profile="paper", sym=True, **W4A4).to_dict()   # given wins
    assert QuantConfig(method, profile="paper", study_grid=False, **W4A4).settings.study_grid is False


@pytest.mark.parametrize("method", ["smoothquant", "duquant"])
def test_paper_models_quantize_save_and_reload_on_the_study_grid(tmp_path, method):
    import dllmq
    from dllmq.quant import quantize, save_quantized
    from dllmq.quant.backend import FAKE, choose_kernel
    from dllmq.quant.qlinear import QuantLinear
    model, tok, _ = dllmq.load_model("random-llada", dtype="float32")
    extra = {"rotation_block": 8, "rotation_steps": 2} if method == "duquant" else {}
    quantize(model, tok, QuantConfig(method, profile="paper", nsamples=2, seqlen=16, **W4A4, **extra),
             progress=False)
    out = save_quantized(model, tok, tmp_path / "q")
    again, _, _ = dllmq.load_model(str(out), dtype="float32")
    assert again.config.raw["quantization_config"]["dllmq"]["study_grid"] is True
    for m in (model, again):
        block = m.get_blocks()[0]
        for name in block.family.block_linears:
            lin = block.get_submodule(name)
            assert lin.act_quantizer.spec.study_grid, name
            if isinstance(lin, QuantLinear):   # the kernel backend refuses it, with its reason
                choice = choose_kernel(lin, "cpu")
                assert choice.kernel == FAKE and "study" in choice.reason
        assert isinstance(block.kv_hook, QKVQuantizer)
    ids = torch.randint(0, 250, (2, 12))
    with torch.no_grad():
        assert torch.allclose(model(ids), again(ids), atol=1e-5)
    plain, tok2, _ = dllmq.load_model("random-llada", dtype="float32")
    quantize(plain, tok2, QuantConfig(method, nsamples=2, seqlen=16, **W4A4, **extra), progress=False)
    assert not any(plain.get_blocks()[0].get_submodule(n).act_quantizer.spec.study_grid
                   for n in plain.family.block_linears)

