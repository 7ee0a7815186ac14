"""FP8 (E4M3), MXFP4 and NVFP4: the numerics against torch's float8 casts and hand-computed values, the
configs, the command line, and quantize -> save -> load giving identical logits."""
import json
import logging

import pytest
import torch

import dllmq
from dllmq.cli import main
from dllmq.errors import DllmqError
from dllmq.quant import PRESETS, QuantConfig, quantize, save_quantized
from dllmq.quant import formats as fm
from dllmq.quant.qlinear_fp import FPQuantLinear

E4M3_REF = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
E4M3_FINITE = ~E4M3_REF.isnan()                      # 0x7F and 0xFF are NaN
E2M1_TABLE = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


# --- element formats ------------------------------------------------------------------------------------

def test_every_e4m3_code_point_quantizes_to_itself_and_decodes_as_torch():
    codes = torch.arange(256, dtype=torch.uint8)
    values = E4M3_REF[E4M3_FINITE]
    assert values.numel() == 254 and values.abs().max() == 448
    assert torch.equal(fm.E4M3.round(values), values)
    assert torch.equal(fm.E4M3.decode(codes)[E4M3_FINITE], values)
    nonzero = E4M3_FINITE & (E4M3_REF != 0)
    assert torch.equal(fm.E4M3.encode(E4M3_REF[nonzero]), codes[nonzero])   # encode is decode's inverse
    assert fm.E4M3.encode(torch.tensor([-0.0])).item() == 0                   # zero is stored as +0


def test_e4m3_rounds_to_nearest_even_like_torch_including_subnormals():
    mags = E4M3_REF[E4M3_FINITE & (E4M3_REF >= 0)].unique().sort().values
    midpoints = (mags[1:] + mags[:-1]) / 2                  # every tie, subnormal ones included
    torch.manual_seed(0)
    spread = torch.randn(20000) * torch.exp(torch.randn(20000) * 4)
    for x in (midpoints, -midpoints, spread, torch.tensor([2.0 ** -10, 3 * 2.0 ** -10, 2.0 ** -12, 1e-30])):
        assert torch.equal(fm.E4M3.round(x), x.to(torch.float8_e4m3fn).float())
    # by hand: ties go to the code with an even last mantissa bit
    assert fm.E4M3.round(torch.tensor([2.0 ** -10])).item() == 0                  # half the smallest subnormal
    assert fm.E4M3.round(torch.tensor([3 * 2.0 ** -10])).item() == 2.0 ** -8     # 1.5 x 2^-9 -> code 2
    assert fm.E4M3.round(torch.tensor([17.0])).item() == 16.0                     # 16 (even) vs 18
    assert fm.E4M3.round(torch.tensor([19.0])).item() == 20.0                     # 18 vs 20 (even)


def test_e4m3_saturates_above_448():
    x = torch.tensor([448.0, 449.0, 464.0, 480.0, 1e6, float("inf"), -500.0, -float("inf")])
    assert fm.E4M3.round(x).tolist() == [448.0] * 6 + [-448.0, -448.0]


def test_every_e2m1_code_point():
    codes = torch.arange(16, dtype=torch.uint8)
    expected = E2M1_TABLE + [-v for v in E2M1_TABLE]
    assert fm.E2M1.decode(codes).tolist() == expected
    values = torch.tensor(expected)
    assert torch.equal(fm.E2M1.round(values), values)
    assert fm.E2M1.encode(values[1:8]).tolist() == list(range(1, 8))
    assert fm.E2M1.encode(values[9:]).tolist() == list(range(9, 16))


def test_e2m1_ties_to_even_and_saturation():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.3, 2.4, 7.0, 100.0, -5.0, -0.75, -7.0])
    assert fm.E2M1.round(x).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, 2.0, 6.0, 6.0, -4.0, -1.0, -6.0]


# --- scales -----------------------------------------------------------------------------------------------

def _mx_block(amax: float) -> torch.Tensor:
    block = torch.linspace(-0.1, 0.1, 32) * amax
    block[7] = amax
    return block


@pytest.mark.parametrize("amax, scale", [(5.0, 1.0), (6.0, 1.0), (7.0, 1.0), (8.0, 2.0), (4.0, 1.0), (3.99, 0.5),
                                         (0.3, 2.0 ** -4), (1.0, 0.25), (1000.0, 128.0)])
def test_mx_scale_is_the_ocp_shared_exponent(amax, scale):
    """X = 2^(floor(log2 amax) - emax) with E2M1's emax = 2 (OCP MX v1.0); values beyond 6 X saturate."""
    t = fm.quantize(_mx_block(amax)[None, :], fm.FORMATS["mxfp4"])
    assert t.scales.tolist() == [[scale]]
    assert t.block_codes.item() == 127 + int(torch.tensor(scale).log2().item())   # E8M0: exponent + 127
    top = t.dequantize()[0, 7].item()
    assert top == min(fm.E2M1.round(torch.tensor(amax / scale)).item(), 6.0) * scale
    if amax in (7.0, 3.99):         # 7 / 1 and 3.99 / 0.5 exceed E2M1's 6: saturated, as the spec's floor rule does
        assert top == 6 * scale


def test_mx_blocks_of_32_and_a_smaller_last_block():
    x = torch.zeros(1, 70)
    x[0, 0], x[0, 40], x[0, 69] = 5.0, 0.3, 100.0
    t = fm.quantize(x, fm.FORMATS["mxfp4"])
    assert t.scales.tolist() == [[1.0, 2.0 ** -4, 16.0]]       # blocks 0-31, 32-63, 64-69
    assert t.dequantize()[0, [0, 40, 69]].tolist() == [4.0, 0.25, 96.0]
    zero = fm.quantize(torch.zeros(1, 32), fm.FORMATS["mxfp4"])
    assert zero.block_codes.item() == 0 and torch.equal(zero.dequantize(), torch.zeros(1, 32))


def test_nvfp4_two_level_scale_by_hand():
    """Tensor scale 10 / (448 x 6); block 1 (amax 10): 10 / 6 / ts = 448; block 2 (amax 5): 224, exact in
    E4M3 (0x76); block 3 (amax 3): 134.4 rounds to 128 (0x70) in E4M3, so 3 / (128 ts) = 6.3 saturates to 6."""
    x = torch.zeros(1, 48)
    x[0, 0], x[0, 16], x[0, 17], x[0, 32], x[0, 33] = 10.0, 5.0, -1.0, 3.0, 0.7
    fmt = fm.FORMATS["nvfp4"]
    ts = fm.weight_tensor_scale(x, fmt)
    assert ts.item() == torch.tensor(10.0 / 2688).item()
    t = fm.quantize(x, fmt, ts)
    assert t.block_codes.tolist() == [[0x7E, 0x76, 0x70]]             # 448, 224, 128 in E4M3
    eff = [448 * ts.item(), 224 * ts.item(), 128 * ts.item()]
    assert torch.allclose(t.scales, torch.tensor([eff]))
    q = t.dequantize()[0]
    assert q[0].item() == pytest.approx(10.0) and q[16].item() == pytest.approx(5.0)
    assert q[17].item() == pytest.approx(-1.0 * eff[1])               # 1 / 0.833 = 1.2 -> E2M1 1.0
    assert q[32].item() == pytest.approx(6 * eff[2])                  # saturated: 2.857 for 3.0
    assert q[33].item() == pytest.approx(fm.E2M1.round(torch.tensor(0.7 / eff[2])).item() * eff[2])
    # a block far below the tensor's amax: its scale underflows E4M3 and the block becomes zero, never NaN
    y = torch.zeros(1, 32)
    y[0, 0], y[0, 16] = 1e6, 1e-6
    assert torch.equal(fm.fake_quantize(y, fmt, fm.weight_tensor_scale(y, fmt))[0, 16:], torch.zeros(16))


@pytest.mark.parametrize("name", ["fp8", "mxfp4", "nvfp4"])
def test_fake_quantization_is_idempotent(name):
    """A second pass picks the same element codes; the values agree exactly where scales are powers of two
    and to float32 rounding of the FP32 scales otherwise."""
    fmt = fm.FORMATS[name]
    torch.manual_seed(1)
    x = torch.randn(16, 70) * torch.exp(torch.randn(16, 1) * 2)
    once = fm.fake_quantize(x, fmt)
    twice = fm.fake_quantize(once, fmt)
    assert torch.equal(fm.quantize(once, fmt).codes, fm.quantize(x, fmt).codes)
    if name == "mxfp4":
        assert torch.equal(once, twice)
    else:
        assert torch.allclose(once, twice, rtol=1e-6, atol=0)
    w, scales, ts = fm.quantize_weight(x, fmt)
    assert torch.equal(fm.quantize_weight(w, fmt)[0], w)
    assert fm.fake_quantize(x.to(torch.bfloat16), fmt).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["fp8", "mxfp4", "nvfp4"])
def test_fp_linear_stores_codes_that_give_back_the_values(name):
    torch.manual_seed(2)
    linear = torch.nn.Linear(70, 24, bias=True)
    w, scales, ts = fm.quantize_weight(linear.weight, fm.FORMATS[name])
    layer = FPQuantLinear.from_values(linear, w, scales, name, ts)
    assert torch.equal(layer.dequantized_weight(), w)
    codes_bytes = 24 * (70 if name == "fp8" else 35)
    assert layer.codes.numel() == codes_bytes and layer.codes.dtype == torch.uint8
    x = torch.randn(3, 70)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, w, linear.bias))
    fresh = FPQuantLinear.empty(70, 24, name, bias=True)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.dequantized_weight(), w)


# --- configs, command line ----------------------------------------------------------------------------------

def test_quant_config_formats_round_trip_and_old_configs_read_as_int():
    c = QuantConfig("rtn", wformat="nvfp4", aformat="fp8")
    assert (c.weight.bits, c.weight.group_size, c.act.bits, c.weight.format, c.act.format) == (4, 16, 8, "nvfp4", "fp8")
    assert QuantConfig.from_dict(c.to_dict()) == c and c.to_dict()["wformat"] == "nvfp4"
    old = QuantConfig("smoothquant", wbits=8, abits=8).to_dict()
    assert "wformat" not in old and "aformat" not in old          # integer configs are flat as before
    assert QuantConfig.from_dict(old).weight.format == "int" and QuantConfig.from_dict(old).act.format == "int"
    assert QuantConfig.from_dict({"method": "gptq", "wbits": 3, "group_size": 128}).weight.fmt.name == "int"
    assert QuantConfig("quarot", wformat="mxfp4", aformat="mxfp4").to_dict()["group_size"] == 32
    assert QuantConfig("gptq", wformat="fp8").weight.group_size == -1


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(wformat="fp8", wbits=4), "contradicts --wformat fp8"),
    (dict(method="smoothquant", aformat="nvfp4", abits=8), "contradicts --aformat nvfp4"),
    (dict(wformat="mxfp4", group_size=128), "fixes its own scale groups"),
    (dict(wformat="fp4"), "not a known number format"),
    (dict(method="duquant", aformat="fp8", act_clip=0.9), "int format only"),
])
def test_contradictory_format_settings_are_one_sentence(kwargs, fragment):
    with pytest.raises(DllmqError, match=fragment):
        QuantConfig(**{"method": "rtn", **kwargs})


def test_cli_bad_format_combination_exits_2_with_one_sentence(capsys, tmp_path):
    for argv, fragment in ((["--wformat", "fp8", "--wbits", "4"], "--wbits 4 contradicts --wformat fp8"),
                           (["--preset", "W4A4", "--wformat", "fp8"], "contradicts --wformat fp8"),
                           (["--method", "gptq", "--wformat", "mxfp4", "--dynamic-groups"], "--dynamic-groups")):
        code = main(["quantize", "random-llada", "--out", str(tmp_path / "q"), *argv])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: ") and "\n" not in err and fragment in err, err
    assert not (tmp_path / "q").exists()


def test_a_float_preset_switched_back_to_int_keeps_its_bits():
    """`--preset W4A4-mxfp4 --aformat int` means int4 activations, not none (it used to turn RTN weight-only)."""
    from dllmq.quant.config import merge_preset
    c = QuantConfig(**{"method": "rtn", **merge_preset(PRESETS["W4A4-mxfp4"], {"aformat": "int"})})
    assert (c.act.bits, c.act.format, c.weight.bits, c.weight.format) == (4, "int", 4, "mxfp4")
    c = QuantConfig(**{"method": "rtn", **merge_preset(PRESETS["W8A8-fp8"], {"wformat": "int"})})
    assert (c.weight.bits, c.weight.format, c.act.bits, c.act.format) == (8, "int", 8, "fp8")
    for name in ("W8A8-fp8", "W4A16-nvfp4", "W4A4-mxfp4"):   # stating the bits changes no resolved config
        preset = {k: v for k, v in PRESETS[name].items() if k not in ("wbits", "abits")}
        assert QuantConfig("rtn", **PRESETS[name]).to_dict() == QuantConfig("rtn", **preset).to_dict()


# --- quantize -> save -> load ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method, preset", [("rtn", "W8A8-fp8"), ("rtn", "W4A16-nvfp4"), ("rtn", "W4A4-mxfp4")])
def test_cli_quantize_save_load_gives_identical_logits(tmp_path, capsys, method, preset):
    out = tmp_path / "q"
    assert main(["quantize", "random-llada", "--method", method, "--preset", preset, "--out", str(out)]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "dllmq_fp" and not (out / "quantize_config.json").exists()
    config = QuantConfig.from_dict(qc["dllmq"])
    assert config == QuantConfig(method, **PRESETS[preset], nsamples=128, seqlen=2048)
    model, tokenizer, _ = dllmq.load_model("random-llada")
    quantize(model, tokenizer, config, progress=False)       # RTN: the same weights as the command's
    ids = torch.randint(0, 100, (2, 24))
    with torch.no_grad():
        loaded, _, _ = dllmq.load_model(str(out))
        assert any(isinstance(m, FPQuantLinear) for m in loaded.modules())
        assert torch.equal(loaded(ids), model(ids))
    assert main(["inspect", str(out)]) == 0
    assert config.weight.format in capsys.readouterr().out.lower()


@pytest.mark.parametrize("method, preset", [("gptq", "W4A16-mxfp4"), ("awq", "W4A16-nvfp4"), ("gptq", "W8A16-fp8")])
def test_calibrated_float_weights_reload_to_identical_logits(tmp_path, method, preset):
    model, tokenizer, _ = dllmq.load_model("random-llada")
    quantize(model, tokenizer, QuantConfig(method, **PRESETS[preset], nsamples=2, seqlen=32), progress=False)
    save_quantized(model, tokenizer, tmp_path / "q")
    ids = torch.randint(0, 100, (2, 24))
    with torch.no_grad():
        assert torch.equal(dllmq.load_model(str(tmp_path / "q"))[0](ids), model(ids))


def test_weight_activation_methods_take_the_formats():
    ids = torch.randint(0, 100, (1, 16))
    for method, extra in (("smoothquant", {}), ("quarot", {"weight_method": "rtn"}), ("duquant", {"rotation_steps": 4}),
                          ("quarot", {})):
        model, tokenizer, _ = dllmq.load_model("random-dream")
        with torch.no_grad():
            reference = model(ids)
        config = QuantConfig(method, wformat="nvfp4", aformat="fp8", nsamples=2, seqlen=32, **extra)
        quantize(model, tokenizer, config, progress=False)
        layers = [m for m in model.modules() if isinstance(m, FPQuantLinear)]
        assert len(layers) == 14 and all(m.act_quantizer.format == "fp8" for m in layers)
        with torch.no_grad():
            logits = model(ids)
        assert torch.isfinite(logits).all() and not torch.equal(logits, reference)


def test_gptq_in_a_float_format_beats_round_to_nearest_on_its_objective():
    from dllmq.quant.gptq_solver import gptq_quantize, relative_output_error
    torch.manual_seed(3)
    x = torch.randn(512, 64) @ torch.randn(64, 64)          # correlated inputs
    H = 2 * x.T @ x / x.shape[0]
    W = torch.randn(32, 64)
    for name in ("fp8", "mxfp4", "nvfp4"):
        fmt = fm.FORMATS[name]
        ts = fm.weight_tensor_scale(W, fmt)
        Q, scale, _, g_idx = gptq_quantize(W, H, fmt.bits, fmt.group_size, True, fmt=fmt,
                                           tensor_scale=None if ts is None else ts.expand(32, 1))
        assert g_idx is None
        FPQuantLinear.from_values(torch.nn.Linear(64, 32, bias=False), Q, scale, name, ts)   # on the format's grid
        rtn = fm.quantize_weight(W, fmt)[0]
        assert relative_output_error(W, Q, H) < relative_output_error(W, rtn, H)


# --- kernels ------------------------------------------------------------------------------------------------

def test_kernel_backend_refuses_fp_layers_in_one_sentence_and_runs_fake(tmp_path, caplog):
    model, tokenizer, _ = dllmq.load_model("random-llada")
    quantize(model, tokenizer, QuantConfig("rtn", wformat="fp8", aformat="fp8"), progress=False)
    save_quantized(model, tokenizer, tmp_path / "q")
    ids = torch.randint(0, 100, (1, 16))
    with caplog.at_level(logging.WARNING, logger="dllmq"):
        kernel, _, _ = dllmq.load_model(str(tmp_path / "q"), backend="kernel")
    refusals = [r.getMessage() for r in caplog.records if "Floating-point layers" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].count(". ") == 0 and "torch._scaled_mm" in refusals[0]
    with torch.no_grad():
        assert torch.equal(kernel(ids), model(ids))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_kernel_equals_fake_quantization_on_gpu():
    from dllmq.quant.activations import ActQuantizer
    from dllmq.quant.backend import FP8ScaledMMLinear, choose_kernel, fp8_kernel_available
    if not fp8_kernel_available():
        pytest.skip("this GPU has no row-wise FP8 torch._scaled_mm")
    torch.manual_seed(4)
    linear = torch.nn.Linear(256, 128, bias=True).cuda()
    w, scales, _ = fm.quantize_weight(linear.weight, fm.FORMATS["fp8"])
    layer = FPQuantLinear.from_values(linear, w, scales, "fp8")
    layer.act_quantizer = ActQuantizer(8, symmetric=True, format="fp8")
    assert choose_kernel(layer).kernel == FP8ScaledMMLinear.kernel
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    fake = layer(x).float()
    real = FP8ScaledMMLinear(layer)(x).float()
    assert ((real - fake).abs().max() / fake.abs().max()).item() < 2e-2


# --- the study and its report ----------------------------------------------------------------------------------

def test_study_grid_labels_fp_rows_next_to_the_integer_ones():
    from dllmq.study.cells import plan_cells
    from dllmq.study.config import parse_study_config
    from dllmq.study.findings import at_bits
    from dllmq.study.grid import Setting
    config = parse_study_config({
        "models": ["random-llada"], "tasks": ["mini_general"],
        "methods": ["fp", {"name": "rtn", "bits": ["W8A8", "W8A8-fp8", "W4A4", "W4A4-mxfp4", "W4A4-nvfp4"]},
                    {"name": "quarot", "bits": ["W4A4"], "wformat": "nvfp4", "aformat": "nvfp4",
                     "weight_method": "rtn"}]})
    cells = plan_cells(config, model_identities={"random-llada": json.dumps({"name": "random-llada"})})
    assert [c.bits for c in cells] == ["FP", "W8A8", "W8A8-fp8", "W4A4", "W4A4-mxfp4", "W4A4-nvfp4", "W4A4-nvfp4"]
    assert cells[2].quant_config().act.format == "fp8" and cells[-1].quant_config().weight.format == "nvfp4"
    settings = sorted({Setting(c.method_name, c.bits) for c in cells}, key=Setting.sort_key)
    assert [s.label for s in settings] == ["FP", "RTN W8A8", "RTN W8A8 (fp8)", "RTN W4A4", "RTN W4A4 (mxfp4)",
                                           "RTN W4A4 (nvfp4)", "QuaRot W4A4 (nvfp4)"]
    # the paper's findings compare integer rows; an FP8 row is shown, never mistaken for W8A8
    assert at_bits({("rtn", "W8A8"): {"avg": 0.5}, ("rtn", "W8A8-fp8"): {"avg": 9.0}}, (8, 8)) == {"rtn": 0.5}
    with pytest.raises(DllmqError, match="repeats rtn at W8A8-fp8"):
        parse_study_config({"models": ["random-llada"], "tasks": ["mini_general"],
                            "methods": [{"name": "rtn", "bits": ["W8A8-fp8"]},
                                        {"name": "rtn", "bits": ["W8A8"], "wformat": "fp8", "aformat": "fp8"}]})
