"""The kernels' GPU forms, checked on the CPU: every branch taken off the CPU gives the same bits as the CPU
branch and as the plain formula, and the whole forward of each kernel layer reads nothing back to the host.

No GPU here, so the device-only code is exercised two ways: the branches are selectable (``cpu_path``,
``fused``) and run on CPU tensors, compared bit for bit; and each kernel layer runs on the "meta" device,
which takes the non-CPU branches and raises on any value read-back (``.item()``, ``if tensor:``), while a
dispatch mode counts the kernels it would launch."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dllmq.models.random_models import random_model
from dllmq.quant import QuantConfig, QuantLinear, quantize
from dllmq.quant import backend
from dllmq.quant import kernels as K
from dllmq.quant.activations import ActQuantizer
from dllmq.quant.backend import FP8ScaledMMLinear, choose_kernel, set_backend, to_kernel
from dllmq.quant.formats import E4M3, FORMATS, fake_quantize as fp_fake_quantize, quantize_weight
from dllmq.quant.qlinear_fp import FPQuantLinear
from dllmq.quant.primitives import QuantSpec, compute_qparams, quantize as quantize_codes, token_qparams

ROW_CASES = [(8, False, 1.0, False), (8, True, 1.0, False), (8, True, 1.0, True), (4, False, 0.9, False),
             (4, True, 0.9, False), (4, True, 1.0, True), (6, False, 1.0, False), (3, False, 0.8, False)]


def _activations(m=41, k=96, dtype=torch.float32, seed=0):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.05, 6, k)
    x[3] = x[3].abs()       # all positive
    x[4] = -x[4].abs()      # all negative
    x[5] = 0                # degenerate
    x[6] = 1e-30            # tiny, constant
    return x.to(dtype)


@pytest.mark.parametrize("bits,symmetric,clip,signed", ROW_CASES)
def test_token_qparams_equal_compute_qparams(bits, symmetric, clip, signed):
    x = _activations()
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="token", clip_ratio=clip, signed_grid=signed)
    scale, zero = compute_qparams(x, spec)
    s, z = token_qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), bits, symmetric, clip, signed)
    assert torch.equal(s, scale)
    assert torch.equal(torch.as_tensor(z).expand_as(zero), zero)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,symmetric,clip,signed", ROW_CASES)
def test_row_quantization_device_form_equals_cpu_form_and_textbook(bits, symmetric, clip, signed, dtype):
    x = _activations(dtype=dtype)
    kw = dict(bits=bits, symmetric=symmetric, clip_ratio=clip, row_sum=True, signed_grid=signed)
    host, device = K.quantize_rows(x, cpu_path=True, **kw), K.quantize_rows(x, cpu_path=False, **kw)
    for a, b in ((host.codes, device.codes), (host.scale, device.scale), (host.row_sum, device.row_sum)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert (host.zero is None) == (device.zero is None)
    assert host.zero is None or torch.equal(host.zero, device.zero)
    # the textbook: compute_qparams + primitives.quantize on the float32 input, stored as c - shift
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="token", clip_ratio=clip, signed_grid=signed)
    scale, zero = compute_qparams(x.float(), spec)
    codes = quantize_codes(x.float(), scale, zero, bits).long()
    shift = zero.long() if bits <= 7 else 128
    assert torch.equal(device.codes.long(), codes - shift)
    residual = 0 if device.zero is None else device.zero.long()[:, None]
    assert torch.equal(device.codes.long() - residual, codes - zero.long())    # c - z, exactly
    assert torch.equal(device.row_sum.long(), device.codes.long().sum(1))


@pytest.mark.parametrize("cpu_path", [True, False])
def test_static_grid_device_form(cpu_path):
    q = ActQuantizer(8, static=True)
    x = _activations()
    q.calibrate(x * 1.3)
    rows = K.quantize_rows(x, 8, False, static=(q.static_scale, q.static_zero), cpu_path=cpu_path)
    x_hat = (rows.codes.float() - (0 if rows.zero is None else rows.zero.float()[:, None])) * rows.scale
    assert torch.equal(x_hat, q(x))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_rescale_is_the_plain_formula(out_dtype, with_bias):
    """int8_linear (the CPU's in-place epilogue) and rescale_fused (the GPU's: acc * s_x in one multiply,
    then * s_w straight into the output dtype) both equal the plain sequence: int32 -> float32, * s_x,
    * s_w, + bias, then one cast."""
    gen = torch.Generator().manual_seed(1)
    x = _activations(m=19, k=64)
    codes = torch.randint(0, 256, (40, 64), generator=gen)
    zero = torch.randint(0, 256, (40,), generator=gen)
    w_int8, w_zero, w_sum = K.int8_weight_parts(codes, zero, 8)
    w_scale = torch.rand(40, generator=gen) * 1e-2
    bias = torch.randn(40, generator=gen).to(torch.bfloat16) if with_bias else None
    rows = K.quantize_rows(x, 8, False, row_sum=True)
    y = K.int8_linear(rows, w_int8, w_scale, w_zero, w_sum, bias, out_dtype)
    exact = (rows.codes.long() - rows.zero.long()[:, None]) @ (codes - zero[:, None]).T   # int64 reference
    plain = exact.to(torch.int32).float() * rows.scale * w_scale
    if bias is not None:
        plain = plain + bias.float()
    assert y.dtype == out_dtype and torch.equal(y, plain.to(out_dtype))
    fused = K.rescale_fused(exact.to(torch.int32), rows.scale, w_scale, bias, out_dtype)
    assert fused.dtype == out_dtype and torch.equal(fused, plain.to(out_dtype))


@pytest.mark.parametrize("m", [1, 5, 16, 17, 23, 24, 40])
def test_cuda_row_padding_keeps_the_product(m):
    gen = torch.Generator().manual_seed(m)
    a = torch.randint(-128, 128, (m, 32), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (24, 32), generator=gen, dtype=torch.int8)
    padded = K.pad_rows_for_cuda(a)
    assert padded.shape[0] > 16 and padded.shape[0] % 8 == 0 and padded.shape[0] - m < 24
    assert torch.equal(padded[:m], a) and not padded[m:].any()
    assert torch.equal(torch._int_mm(padded, b.t())[:m], (a.long() @ b.long().T).to(torch.int32))


def test_fp8_cast_is_the_e4m3_rounding():
    """The float8_e4m3fn cast the FP8 kernel relies on rounds every value exactly as E4M3.round: all grid
    values, midpoints and their neighbours, every bf16 value in range, random float32 down to subnormals."""
    mags = E4M3.magnitudes()
    mid = (mags[1:] + mags[:-1]) / 2
    gen = torch.Generator().manual_seed(0)
    v = torch.cat([mags, mid, torch.nextafter(mid, torch.full_like(mid, 1e9)), torch.nextafter(mid, torch.zeros_like(mid)),
                   torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float(),
                   torch.rand(200_000, generator=gen) * 448, torch.rand(100_000, generator=gen) * 2**-6,
                   torch.tensor([448.0, 448.00003, 463.9])])
    v = v[torch.isfinite(v) & (v.abs() <= 460)]
    v = torch.cat([v, -v])
    assert torch.equal(v.to(torch.float8_e4m3fn).view(torch.uint8),
                       E4M3.round(v).to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_rows_are_the_fake_quantizers_values(dtype):
    x = _activations(dtype=dtype)
    codes, scale = K.quantize_fp8_rows(x)
    assert codes.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert torch.equal(codes.float() * scale, fp_fake_quantize(x.float(), FORMATS["fp8"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,group", [(64, 256, 64), (192, 512, 128), (128, 96, 32)])
def test_fused_int4_dequantization_is_bit_identical(dtype, n, k, group):
    gen = torch.Generator().manual_seed(n + k)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    zero = torch.randint(0, 16, (k // group, n), generator=gen).to(torch.uint8)
    scale = (torch.rand(k // group, n, generator=gen) + 0.05).half()
    layout = K.int4_layout()
    packed = K.pack_int4(codes)
    cpu = K.dequantize_int4(packed, n, k, layout, scale, zero, group, dtype, fused=False).clone()
    fused = K.dequantize_int4(packed, n, k, layout, scale, zero, group, dtype, fused=True)
    textbook = ((codes.T.float() - zero.float().repeat_interleave(group, 0))
                * scale.float().repeat_interleave(group, 0)).to(dtype)
    assert torch.equal(cpu, textbook) and torch.equal(fused, textbook)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_weight_only_dequant_path_uses_the_fake_weight(dtype, bias):
    q = _linear(96, 64, bits=8, group=-1, act_bits=None, bias=bias).to(dtype)
    layer = to_kernel(q)
    assert layer.kernel == "int8_weight"
    eye = torch.eye(64, dtype=dtype)       # x = I: the output is the weight itself, exactly
    w = K.int8_weight_dequant_linear(eye, layer.weight, layer.scales[0].float(), layer.w_zero, None)
    assert torch.equal(w.t(), q.dequantized_weight().to(dtype))
    x = _activations(m=7, k=64, dtype=dtype)
    with torch.no_grad():
        y = K.int8_weight_dequant_linear(x, layer.weight, layer.scales[0].float(), layer.w_zero, layer.bias)
        assert (y.float() - q(x).float()).abs().max() <= 1e-5 * q(x).float().abs().max()


def _linear(out_f, in_f, bits, group, act_bits, bias=False, symmetric_act=False, static=False):
    gen = torch.Generator().manual_seed(out_f * in_f + bits)
    w = torch.randn(out_f, in_f, generator=gen) * 0.05
    spec = QuantSpec(bits=bits, granularity="channel") if group == -1 else \
        QuantSpec(bits=bits, granularity="group", group_size=group)
    scale, zero = compute_qparams(w, spec)
    if group == -1:
        scale, zero = scale.reshape(-1, 1), zero.reshape(-1, 1)
    linear = torch.nn.Linear(in_f, out_f, bias=bias)
    linear.weight.data = w
    if bias:
        linear.bias.data = torch.randn(out_f, generator=gen)
    q = QuantLinear.from_float(linear, scale, zero, bits, group)
    if act_bits is not None:
        q.act_quantizer = ActQuantizer(act_bits, symmetric=symmetric_act, static=static)
        if static:
            q.act_quantizer.calibrate(torch.randn(64, in_f, generator=gen))
    return q


class _Launches(TorchDispatchMode):
    """Counts the ops a forward dispatches, views and allocations apart (they launch no kernel)."""

    FREE = {"view", "slice", "t", "expand", "select", "alias", "unsqueeze", "transpose", "detach", "empty",
            "empty_like", "reshape", "_reshape_alias", "as_strided", "lift_fresh"}
    READBACK = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "allclose"}

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def kernels(self) -> int:
        return sum(n for op, n in self.ops.items() if op not in self.FREE)


@pytest.mark.parametrize("case,limit", [
    (dict(bits=8, group=-1, act_bits=8), 31),                            # W8A8, asymmetric activations
    (dict(bits=8, group=-1, act_bits=8, symmetric_act=True), 26),
    (dict(bits=4, group=-1, act_bits=4, symmetric_act=True), 26),       # W4A4 (QuaRot-style)
    (dict(bits=8, group=-1, act_bits=8, static=True), 20),
    (dict(bits=4, group=32, act_bits=None), 8),                          # W4A16: unpack, dequantize, GEMM
    (dict(bits=8, group=-1, act_bits=None), 4),                          # W8A16
])
def test_kernel_layers_off_the_cpu_read_nothing_back(case, limit):
    """On "meta" tensors the layers take their non-CPU branches; a value read back to the host (a GPU
    sync) would raise there, and the dispatch mode would see it. The kernel counts are ceilings: the
    per-layer overhead the GPU check measured (~0.5 ms per linear) came from launching ~45 of them."""
    q = _linear(256, 128, **case)
    layer = to_kernel(q).to("meta")
    x = torch.randn(2, 40, 128, device="meta", dtype=torch.bfloat16)
    with torch.no_grad():
        layer(x)                       # first call caches the float32 weight scales
        x = torch.randn(2, 40, 128, device="meta", dtype=torch.bfloat16)   # a new input: quantized again
        with _Launches() as seen:
            y = layer(x)
    assert y.shape == (2, 40, 256) and y.dtype == torch.bfloat16
    assert not set(seen.ops) & _Launches.READBACK, seen.ops
    assert seen.kernels <= limit, dict(seen.ops)


def test_fp8_activation_quantization_reads_nothing_back():
    x = torch.randn(64, 128, device="meta", dtype=torch.bfloat16)
    with _Launches() as seen:
        codes, scale = K.quantize_fp8_rows(x)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    assert not set(seen.ops) & _Launches.READBACK and seen.kernels <= 9, dict(seen.ops)


def test_fp8_layer_reads_nothing_back():
    """The FP8 layer's whole forward (torch._scaled_mm has a meta form) on "meta": no read-back, few kernels."""
    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    linear = torch.nn.Linear(128, 256, bias=False)
    values, scales, _ = quantize_weight(w, FORMATS["fp8"])
    q = FPQuantLinear.from_values(linear, values, scales, "fp8")
    q.act_quantizer = ActQuantizer(8, symmetric=True, format="fp8")
    layer = FP8ScaledMMLinear(q).to("meta")
    x = torch.randn(2, 40, 128, device="meta", dtype=torch.bfloat16)
    with torch.no_grad(), _Launches() as seen:
        y = layer(x)
    assert y.shape == (2, 40, 256) and y.dtype == torch.bfloat16
    assert not set(seen.ops) & _Launches.READBACK and seen.kernels <= 10, dict(seen.ops)


def test_weight_only_kernels_are_chosen_for_cuda():
    assert choose_kernel(_linear(256, 128, 4, 32, None), "cuda").kernel == "int4_weight"
    assert choose_kernel(_linear(256, 128, 8, -1, None), "cuda").kernel == "int8_weight"
    assert choose_kernel(_linear(256, 128, 8, -1, 8), "cuda").kernel == "int8_dynamic"


@pytest.mark.parametrize("settings", [dict(method="rtn", wbits=8, abits=8),
                                      dict(method="quarot", wbits=4, abits=4, weight_method="rtn")])
def test_shared_rows_give_the_same_model_output_and_quantize_less(monkeypatch, settings):
    """Off the CPU, linears reading one tensor (q/k/v, gate/up) share its quantized rows. Forced on here:
    the logits are bit-identical to unshared ones, and each block quantizes 4 inputs instead of 7."""
    model, tok = random_model("random-llada", seed=3)
    quantize(model, tok, QuantConfig(**settings), progress=False)
    set_backend(model, "kernel")
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    calls = []
    real = K.quantize_rows
    monkeypatch.setattr(K, "quantize_rows", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        alone = model(ids)
        n_alone, calls[:] = len(calls), []
        monkeypatch.setattr(backend, "share_rows", lambda device: True)
        shared = model(ids)
    blocks = len(model.get_blocks())
    assert n_alone == 7 * blocks and len(calls) == 4 * blocks
    assert torch.equal(shared, alone)


def test_static_grids_are_never_shared(monkeypatch):
    q1, q2 = _linear(64, 96, 8, -1, 8, static=True), _linear(64, 96, 8, -1, 8, static=True)
    q2.act_quantizer.static_scale.mul_(2)           # another grid: sharing would be wrong
    k1, k2 = to_kernel(q1), to_kernel(q2)
    monkeypatch.setattr(backend, "share_rows", lambda device: True)
    x = _activations(m=9, k=96)
    with torch.no_grad():
        k1(x)                                       # the last input is x, quantized on k1's grid
        y2, ref = k2(x), q2(x)
        assert torch.equal(y2, k2(x.clone()))       # a fresh tensor: nothing to share
    assert (y2 - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_int4_layer_on_the_dequant_path_equals_fake_in_float32():
    """The path CUDA takes for every input (dequantize + GEMM) equals fake quantization on the CPU too."""
    q = _linear(96, 128, 4, 32, None)
    layer = to_kernel(q)
    x = _activations(m=200, k=128)        # >= INT4_OP_MAX_ROWS rows and float32: the dequant path
    with torch.no_grad():
        y, ref = layer(x), q(x)
    assert layer.last_path == "int4_dequant"
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.equal(y, x @ q.dequantized_weight().t())   # the same weight, the same GEMM


@pytest.mark.parametrize("settings,kernel", [(dict(method="rtn", wbits=8, abits=8), "int8_dynamic"),
                                             (dict(method="rtn", wbits=4, group_size=32), "int4_weight")])
def test_whole_kernel_model_off_the_cpu_reads_nothing_back(settings, kernel):
    """A whole kernel-backed model's forward on "meta" (the GPU branches, rows shared across q/k/v and
    gate/up): no read-back anywhere, and W8A8 launches far fewer kernels than unshared layers would."""
    model, tok = random_model("random-llada", seed=4)
    quantize(model, tok, QuantConfig(**settings), progress=False)
    assert set(set_backend(model, "kernel")) == {kernel}
    model.to(device="meta", dtype=torch.bfloat16)
    ids = torch.zeros(1, 48, dtype=torch.long, device="meta")
    with torch.no_grad():
        model(ids)
        with _Launches() as seen:
            model(ids)
    assert not set(seen.ops) & _Launches.READBACK, seen.ops
    if kernel == "int8_dynamic":   # one activation quantization per distinct input: 4 per block, not 7
        assert seen.ops["aminmax"] == 4 * len(model.get_blocks())
