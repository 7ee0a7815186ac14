"""The pipeline end to end: every method on every family, saved and reloaded, and the CLI's errors."""
import json
from pathlib import Path

import pytest
import torch

from dllmq.cli import main
from dllmq.errors import DllmqError
from dllmq.models.random_models import random_model
from dllmq.quant import QuantConfig, quantize, save_quantized

FAST = dict(nsamples=4, seqlen=32)


def test_w3_is_coarser_than_w4_and_gptq_beats_rtn_on_its_objective():
    errors = {}
    for method in ("rtn", "gptq"):
        for bits in (3, 4):
            model, tok = random_model("random-llada", seed=2)
            config = QuantConfig(method=method, wbits=bits, group_size=32, nsamples=8, seqlen=64)
            report = quantize(model, tok, config, progress=False)
            errors[method, bits] = sum(l.error for l in report.layers) / len(report.layers)
    assert errors["rtn", 3] > errors["rtn", 4]
    assert errors["gptq", 3] > errors["gptq", 4]


def test_gptq_output_error_below_rtn_on_the_same_inputs():
    """Measure both on block 0's real calibration inputs (RTN reports weight error, so recompute)."""
    from dllmq.quant.gptq_solver import HessianAccumulator, gptq_quantize
    from dllmq.quant.pipeline import capture_block_inputs
    from dllmq.quant.rounding import rtn_weight
    from dllmq.quant.specs import WeightSpec
    from dllmq.data import calibration_set

    model, tok = random_model("random-llada", seed=2)
    ids = calibration_set(tok, "wiki", 8, 64, seed=0)
    inputs, rope, mask = capture_block_inputs(model, ids, torch.device("cpu"), torch.device("cpu"))
    block = model.get_blocks()[0]
    acc = HessianAccumulator(block.up_proj.in_features, "cpu")
    handle = block.up_proj.register_forward_hook(lambda m, a, o: acc.add(a[0]))
    with torch.no_grad():
        for x in inputs:
            block(x, rope, mask)
    handle.remove()
    W = block.up_proj.weight.data.float()
    q_gptq = gptq_quantize(W, acc.H, 3, 32)[0]
    q_rtn = rtn_weight(W, WeightSpec(3, 32, False)).weight

    def err(q):
        d = W - q
        return torch.einsum("oi,ij,oj->", d, acc.H, d)
    assert err(q_gptq) < err(q_rtn)


def test_already_quantized_model_is_refused():
    model, tok = random_model("random-llada")
    quantize(model, tok, QuantConfig(method="rtn"), progress=False)
    with pytest.raises(DllmqError, match="already quantized"):
        quantize(model, tok, QuantConfig(method="rtn"), progress=False)


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    import dllmq.models.loading as loading

    model, tok = random_model("random-llada")
    quantize(model, tok, QuantConfig(method="rtn"), progress=False)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(loading, "save_tensors", boom)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, tok, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def _cli_error(capsys, argv, fragment):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert fragment in err, err


def test_cli_quantize_bad_inputs(capsys, tmp_path):
    out = str(tmp_path / "q")
    base = ["quantize", "random-llada", "--out", out]
    _cli_error(capsys, base + ["--method", "nope"], "Unknown method")
    _cli_error(capsys, base + ["--wbits", "9"], "between 2 and 8")
    _cli_error(capsys, base + ["--wbits", "1"], "between 2 and 8")
    _cli_error(capsys, base + ["--group-size", "0"], "Group size")
    _cli_error(capsys, base + ["--group-size", "-5"], "Group size")
    _cli_error(capsys, base + ["--method", "gptq", "--nsamples", "0"], "nsamples")
    _cli_error(capsys, base + ["--method", "gptq", "--seqlen", "5000"], "context")
    short = tmp_path / "short.txt"
    short.write_text("too short for a window")
    _cli_error(capsys, base + ["--method", "gptq", "--calib", str(short), "--seqlen", "256"], "shorter than one window")
    _cli_error(capsys, base + ["--preset", "W9"], "Unknown preset")
    Path(out).mkdir()
    _cli_error(capsys, base, "already exists")
    assert not any(p.name.startswith(".q.tmp") for p in tmp_path.iterdir())


def test_cli_quantize_then_use(capsys, tmp_path):
    out = tmp_path / "q"
    code = main(["quantize", "random-dream", "--method", "gptq", "--preset", "W3A16-g128", "--group-size", "16",
                 "--nsamples", "4", "--seqlen", "32", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "gptq: 14 linears" in text and "saved" in text
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["bits"], config["group_size"]) == (3, 16)    # explicit flag beats the preset
    assert main(["generate", str(out), "--prompt", "hi", "--gen-length", "8", "--steps", "4"]) == 0
    assert main(["inspect", str(out)]) == 0
    assert "quantized" in capsys.readouterr().out


def test_cli_quantize_defaults_fit_the_default_model(capsys, tmp_path):
    """`dllmq quantize --method gptq --out q/` on dllmq-tiny (context 1024): the window defaults to the
    model's context instead of 2048, and the CLI says so in one line."""
    out = tmp_path / "q"
    code = main(["quantize", "--method", "gptq", "--nsamples", "1", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    notes = [line for line in captured.err.splitlines() if line.startswith("note: ")]
    assert notes == ["note: --seqlen not given: calibration windows of 1024 tokens (the smaller of 2048 and "
                     "the model's context of 1024)"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["dllmq"]["seqlen"] == 1024
