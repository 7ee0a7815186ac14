"""Every method on every family: quantize, save, load, identical logits (weight-only and weight-activation
alike, with their online transforms, activation and K/V quantizers rebuilt on load)."""
import json

import pytest
import torch

import dllmq
from dllmq.models.random_models import random_model
from dllmq.quant import QuantConfig, QuantLinear, quantize, save_quantized
from dllmq.quant.api import directory_bytes, theoretical_bytes

FAST = dict(nsamples=4, seqlen=32)
W4 = dict(wbits=4, group_size=32)
W4A4 = dict(wbits=4, abits=4)
CASES = [("rtn", W4), ("gptq", W4), ("awq", W4),
         ("rtn", W4A4), ("smoothquant", W4A4), ("quarot", {**W4A4, "kv_bits": 4}),
         ("quarot", {**W4A4, "weight_method": "rtn"}), ("duquant", W4A4)]


@pytest.mark.parametrize("method,settings", CASES, ids=[f"{m}-{'-'.join(map(str, s.values()))}" for m, s in CASES])
@pytest.mark.parametrize("name", ["random-llada", "random-dream", "random-llama"])
def test_save_load_identical_logits(tmp_path, name, method, settings):
    model, tok = random_model(name, seed=2)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp = model(ids)
    report = quantize(model, tok, QuantConfig(method=method, **settings, **FAST), progress=False)
    assert len(report.layers) == model.config.n_layers * 7
    assert all(isinstance(b.get_submodule(n), QuantLinear) for b in model.get_blocks() for n in model.family.block_linears)
    out = save_quantized(model, tok, tmp_path / "q")
    loaded, _, _ = dllmq.load_model(out)
    with torch.no_grad():
        q = model(ids)
        assert torch.equal(q, loaded(ids))
    assert abs(directory_bytes(out) / theoretical_bytes(loaded) - 1) < 0.05
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["dllmq"]["method"] == method and qc["bits"] == 4
    if "abits" not in settings:
        assert 0 < (q - fp).norm() / fp.norm() < 0.3   # 4-bit weights move the logits, but not wildly
        return
    assert qc["dllmq"]["abits"] == 4
    assert sum(m.act_quantizer is not None for m in loaded.modules() if isinstance(m, QuantLinear)) == len(report.layers)
    assert all((b.kv_hook is not None) == ("kv_bits" in settings) for b in loaded.get_blocks())
    if method == "quarot" and name == "random-llama":
        assert cfg["tie_word_embeddings"] is False       # the rotation unties embedding and head
