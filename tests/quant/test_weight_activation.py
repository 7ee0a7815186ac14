"""Weight-activation quantization: Hadamards, invariance of every transform, flatter activations,
quantizers, and saved models with their online transforms."""

import pytest
import torch

from dllmq.cli import main
from dllmq.errors import DllmqError
from dllmq.models.random_models import random_model
from dllmq.quant import QuantConfig, quantize
from dllmq.quant.activations import ActQuantizer, KVQuantizer
from dllmq.quant.hadamard import HadamardTransform, factorize, fast_hadamard, hadamard_matrix
from dllmq.quant.online import seen_input
from dllmq.quant.block import BlockContext
from dllmq.quant.methods.duquant import DuQuant
from dllmq.quant.methods.quarot import rotate_model
from dllmq.quant.methods.smoothquant import SmoothQuant
from dllmq.quant.pipeline import capture_block_inputs
from dllmq.quant.primitives import QuantSpec, fake_quantize

FAMILIES = ["random-llada", "random-dream", "random-llama"]
SIZES = [1, 2, 4, 12, 16, 28, 36, 64, 112, 128, 148, 296, 384, 576, 1536, 3584, 4096]


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_is_orthogonal_and_fast_transform_matches(n):
    H = hadamard_matrix(n)
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))
    x = torch.randn(3, 5, n, dtype=torch.float64)
    assert torch.allclose(fast_hadamard(x), x @ H / n ** 0.5, atol=1e-10)


def test_fast_hadamard_in_row_chunks_equals_the_whole(monkeypatch):
    """Long inputs are transformed a few rows at a time on CPU (cache-sized passes); same numbers."""
    import dllmq.quant.hadamard as hadamard_module
    x = torch.randn(2, 37, 384, dtype=torch.float64)
    whole = x @ hadamard_matrix(384) / 384 ** 0.5
    monkeypatch.setattr(hadamard_module, "_CHUNK_ELEMENTS", 384 * 5)  # 5 rows per chunk, 74 rows in all
    assert torch.allclose(fast_hadamard(x), whole, atol=1e-10)
    assert torch.allclose(fast_hadamard(x, scale=2.0), whole * 384 ** 0.5 * 2.0, atol=1e-9)


def test_real_model_sizes_are_supported():
    assert factorize(12288) == (12, 1024)      # LLaDA-8B FFN
    assert factorize(18944) == (148, 128)      # Dream-7B FFN: Paley II of q = 73
    assert factorize(3584) == (28, 128)        # Dream-7B hidden
    H = hadamard_matrix(18944 // 128 * 2)      # 296 = 148 x 2, built and checked in full
    assert torch.equal(H @ H.T, 296 * torch.eye(296, dtype=torch.float64))


def test_unsupported_size_is_refused_with_the_supported_forms():
    with pytest.raises(DllmqError, match="m x 2\\^k"):
        factorize(21)                           # odd, and 20 is not prime
    with pytest.raises(DllmqError):
        HadamardTransform(0)


def _calibration(model, n=3, length=24):
    ids = torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(0))
    return capture_block_inputs(model, ids, torch.device("cpu"), torch.device("cpu"))


def _transform_blocks(model, method):
    """Run a method's full-precision transform block by block, feeding transformed outputs on."""
    inputs, rope, mask = _calibration(model)
    for i, block in enumerate(model.get_blocks()):
        ctx = BlockContext(block, i, inputs, rope, mask, torch.device("cpu"), method.config)
        (method.smooth if isinstance(method, SmoothQuant) else method.transform_block)(ctx)
        inputs = ctx.run(keep_outputs=True)


def _apply_transform(model, method):
    """A method's full-precision transform only (no quantization)."""
    if method == "quarot":
        rotate_model(model, seed=0)
    else:
        config = QuantConfig(method=method, wbits=4, abits=4)
        _transform_blocks(model, SmoothQuant(config) if method == "smoothquant" else DuQuant(config))


def _logits(model):
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("method", ["smoothquant", "quarot", "duquant"])
def test_transforms_leave_logits_unchanged(name, method):
    """float64 model; SmoothQuant and QuaRot are exact to 1e-10, DuQuant's rotations are stored in
    float32 (as saved), so 1e-6."""
    model, _ = random_model(name, seed=3, dtype=torch.float64)
    before = _logits(model)
    _apply_transform(model, method)
    after = _logits(model)
    tol = 1e-6 if method == "duquant" else 1e-10
    assert ((after - before).norm() / before.norm()).item() < tol


def _planted_outliers(seed=4):
    model, tok = random_model("random-llada", seed=seed)
    with torch.no_grad():
        for block in model.get_blocks():
            block.attn_norm.weight[[5, 40, 99]] *= 60.0   # a few channels large on every token
    return model, tok


def _flatness(model, name="q_proj"):
    """mean over tokens of max|x| / mean|x| of the input q_proj's weight sees, in every block."""
    inputs, rope, mask = _calibration(model)
    ratios = []
    for block in model.get_blocks():
        seen = []
        linear = block.get_submodule(name)
        handle = linear.register_forward_hook(lambda m, a, o: seen.append(seen_input(m, a[0])))
        with torch.no_grad():
            inputs = [block(x, rope, mask) for x in inputs]
        handle.remove()
        x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).abs()
        ratios.append((x.amax(-1) / x.mean(-1)).mean().item())
    return sum(ratios) / len(ratios)


@pytest.mark.parametrize("method", ["smoothquant", "quarot", "duquant"])
def test_transformed_activations_are_flatter(method):
    model, tok = _planted_outliers()
    before = _flatness(model)
    _apply_transform(model, method)
    after = _flatness(model)
    assert after < 0.5 * before, (before, after)


def test_act_quantizer_is_per_token_and_static_covers_calibration():
    x = torch.randn(2, 7, 32) * torch.linspace(0.1, 10, 7)[None, :, None]
    q = ActQuantizer(4, symmetric=True, clip_ratio=0.9)
    assert torch.equal(q(x), fake_quantize(x, QuantSpec(bits=4, symmetric=True, granularity="token", clip_ratio=0.9)))
    static = ActQuantizer(8, static=True)
    static.calibrate(x[0])
    static.calibrate(x[1])
    err = (static(x) - x).abs().max()
    assert err <= static.static_scale / 2 + 1e-6


def test_kv_quantizer_rotation_keeps_scores():
    q, k, v = (torch.randn(1, 2, 9, 32, dtype=torch.float64) for _ in range(3))
    q2, k2, v2 = KVQuantizer(8, 128, 1.0, rotate_qk=True)(q, k, v)
    assert torch.allclose(q2 @ k2.transpose(-1, -2), q @ k.transpose(-1, -2), atol=0.1)
    assert not torch.allclose(k2, k, atol=1e-3)          # K really was rotated
    assert (v2 - v).abs().max() < 0.05                   # V quantized at 8 bits, not rotated


def test_w8a8_is_closer_to_fp_than_w4a4():
    errs = {}
    for preset in ("W8A8", "W4A4"):
        model, tok = random_model("random-llada", seed=2)
        fp = _logits(model)
        bits = dict(wbits=8, abits=8) if preset == "W8A8" else dict(wbits=4, abits=4)
        quantize(model, tok, QuantConfig(method="quarot", weight_method="rtn", **bits), progress=False)
        errs[preset] = ((_logits(model) - fp).norm() / fp.norm()).item()
    assert errs["W8A8"] < 0.2 * errs["W4A4"]


def test_cli_weight_activation_errors_and_presets(capsys, tmp_path):
    out = str(tmp_path / "q")
    for argv, fragment in [(["--method", "smoothquant"], "--abits"),
                           (["--method", "gptq", "--abits", "8"], "weight-only"),
                           (["--method", "quarot", "--preset", "W4A4", "--kv-bits", "12"], "kv-bits"),
                           (["--method", "duquant", "--preset", "W4A4", "--act-clip", "1.5"], "act-clip")]:
        assert main(["quantize", "random-llada", "--out", out] + argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and fragment in err and "\n" not in err, err
    assert main(["quantize", "random-llada", "--method", "duquant", "--preset", "W4A4", "--nsamples", "4",
                 "--seqlen", "32", "--out", out]) == 0
    assert "duquant" in capsys.readouterr().out
    assert main(["inspect", out]) == 0
    assert "W4A4" in capsys.readouterr().out
