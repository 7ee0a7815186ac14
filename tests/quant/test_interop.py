"""Other tools' checkpoints: GPTQ v1/v2, AWQ GEMM and compressed-tensors read as dllmq models, and dllmq's
weight-only models written in those layouts. Fixtures are built here from each format's definition, and
compressed-tensors' own decompressor checks what dllmq writes."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import dllmq
from dllmq.cli import main
from dllmq.errors import DllmqError
from dllmq.models.random_models import random_model
from dllmq.quant import QuantConfig, QuantLinear, quantize, save_quantized
from dllmq.quant.interop import awq
from dllmq.quant.interop.export import export_quantized
from dllmq.quant.packing import pack_codes, unpack_codes

IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
FAMILIES = ["random-llada", "random-dream", "random-llama"]


def quantized(name: str, **settings):
    model, tok = random_model(name, seed=2)
    quantize(model, tok, QuantConfig("rtn", **{"wbits": 4, "group_size": 8, **settings}), progress=False)
    return model, tok


def logits(model):
    with torch.no_grad():
        return model(IDS)


def quant_layers(model) -> dict[str, QuantLinear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("fmt,settings", [("gptq", {"sym": True}), ("awq", {}), ("compressed-tensors", {}),
                                          ("compressed-tensors", {"sym": True, "wbits": 3})])
@pytest.mark.parametrize("name", FAMILIES)
def test_export_then_read_gives_identical_logits(tmp_path, name, fmt, settings):
    model, tok = quantized(name, **settings)
    exported = export_quantized(model, tok, tmp_path / "e", fmt)
    assert not list(exported.glob("*.dllmq*"))
    qc = json.loads((exported / "config.json").read_text())["quantization_config"]
    assert "dllmq" not in qc and qc["meta"]["quantizer"] == [f"dllmq:{dllmq.__version__}"]
    loaded, _, _ = dllmq.load_model(exported)
    assert torch.equal(logits(model), logits(loaded))
    source = loaded.config.raw["quantization_config"]["source"]
    assert source["quantizer"] == f"dllmq:{dllmq.__version__}"
    # and saved again by dllmq, it is an ordinary dllmq model that still remembers where it came from
    again = save_quantized(loaded, None, tmp_path / "again")
    reloaded, _, _ = dllmq.load_model(again)
    assert torch.equal(logits(model), logits(reloaded))
    assert json.loads((again / "config.json").read_text())["quantization_config"]["source"] == source


def test_gptq_v1_fixture_reads_as_its_v2_twin(tmp_path):
    """A v1 checkpoint written from the format's definition (zero points minus one, config as AutoGPTQ's
    quantize_config.json with no checkpoint_format) loads to the same weights as the v2 original."""
    model, tok = quantized("random-dream", sym=False, group_size=16)
    v2 = save_quantized(model, tok, tmp_path / "v2")
    v1 = tmp_path / "v1"
    v1.mkdir()
    tensors = load_file(v2 / "model.safetensors")
    for key in [k for k in tensors if k.endswith(".qzeros")]:
        q = quant_layers(model)[key.removesuffix(".qzeros")]
        zeros = unpack_codes(tensors[key], 4, q.out_features, dim=1).to(torch.int32)
        tensors[key] = pack_codes(((zeros - 1) % 16).to(torch.uint8), 4, dim=1)  # v1: zero - 1, mod 2^bits
    save_file(tensors, v1 / "model.safetensors")
    config = json.loads((v2 / "config.json").read_text())
    del config["quantization_config"]
    (v1 / "config.json").write_text(json.dumps(config))
    (v1 / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 16, "desc_act": False,
                                                         "sym": False, "true_sequential": True}))
    loaded, _, _ = dllmq.load_model(v1)
    for path, q in quant_layers(model).items():
        assert torch.equal(loaded.get_submodule(path).dequantized_weight(), q.dequantized_weight())
    assert torch.equal(logits(model), logits(loaded))
    assert main(["inspect", str(v1)]) == 0


def test_awq_packing_order_against_hand_packed_words():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 15, 0, 9, 10, 11, 12, 13, 14]], dtype=torch.uint8)
    # by the definition: nibble i of word c holds output channel 8c + (0, 2, 4, 6, 1, 3, 5, 7)[i]
    expected = []
    for c in range(2):
        word = 0
        for i, channel in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):
            word |= int(codes[0, 8 * c + channel]) << (4 * i)
        expected.append(word - (1 << 32) if word >= 1 << 31 else word)
    assert awq.pack(codes).tolist() == [expected]
    assert expected[0] == 0x86427531 - (1 << 32)     # nibbles 1 3 5 7 2 4 6 8 from the low end, as int32
    assert torch.equal(awq.unpack(awq.pack(codes)), codes)


def test_compressed_tensors_library_decompresses_what_dllmq_writes(tmp_path):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    for sym in (True, False):
        model, tok = quantized("random-llada", sym=sym, group_size=16)
        out = export_quantized(model, tok, tmp_path / f"ct{sym}", "compressed-tensors")
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
        tensors = load_file(out / "model.safetensors")
        for path, q in quant_layers(model).items():
            local = {k.removeprefix(path + "."): v for k, v in tensors.items() if k.startswith(path + ".weight_")}
            dense = PackedQuantizationCompressor.decompress(local, scheme)["weight"]   # computed in fp16, the
            assert torch.equal(dense, q.dequantized_weight().to(dense.dtype)), (ct.__version__, path)  # scales' dtype


def test_a_checkpoint_that_left_some_linears_in_full_precision(tmp_path):
    """Like the study's GPTQ runs on LLaDA, where q/k/v were never quantized."""
    model, tok = quantized("random-llada")
    out = save_quantized(model, tok, tmp_path / "g")
    tensors = load_file(out / "model.safetensors")
    fp, _ = random_model("random-llada", seed=2)
    for i, block in enumerate(fp.get_blocks()):
        path = f"model.transformer.blocks.{i}.q_proj"
        for key in [k for k in tensors if k.startswith(path + ".")]:
            del tensors[key]
        tensors[path + ".weight"] = block.q_proj.weight.detach().clone()
    save_file(tensors, out / "model.safetensors")
    loaded, _, _ = dllmq.load_model(out)
    blocks = loaded.get_blocks()
    assert all(type(b.q_proj) is nn.Linear and isinstance(b.k_proj, QuantLinear) for b in blocks)
    assert torch.equal(blocks[0].q_proj.weight, fp.get_blocks()[0].q_proj.weight)
    assert loaded.config.raw["quantization_config"]["modules_in_block_to_quantize"][0] == ["k_proj", "v_proj"]


@pytest.mark.parametrize("qc, fragment", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "'marlin'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "lm_head": True}, "LM head"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "'gemv'"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {}}, "'float-quantized'"),
])
def test_unsupported_schemes_get_one_sentence(tmp_path, capsys, qc, fragment):
    model, tok = quantized("random-llama")
    out = save_quantized(model, tok, tmp_path / "q")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(config))
    for argv in (["inspect", str(out)], ["generate", str(out), "--prompt", "hi", "--gen-length", "4"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and fragment in err and "\n" not in err, err


def test_saved_models_carry_what_gptq_tools_read_and_exports_refuse_activation_quantization(tmp_path, capsys):
    model, tok = quantized("random-llama", sym=True)
    out = save_quantized(model, tok, tmp_path / "w")
    tool = json.loads((out / "quantize_config.json").read_text())
    assert (tool["checkpoint_format"], tool["bits"], tool["sym"], tool["quant_method"]) == ("gptq_v2", 4, True, "gptq")
    assert tool["meta"]["quantizer"] == [f"dllmq:{dllmq.__version__}"]
    assert main(["inspect", str(out)]) == 0 and "RTN W4A16" in capsys.readouterr().out

    wa, tok = random_model("random-llama", seed=2)
    quantize(wa, tok, QuantConfig("rtn", wbits=4, abits=4), progress=False)
    wa_dir = save_quantized(wa, tok, tmp_path / "wa")
    assert not (wa_dir / "quantize_config.json").exists()
    assert main(["export", str(wa_dir), "--format", "gptq", "--out", str(tmp_path / "x")]) == 2
    assert "only run in dllmq" in capsys.readouterr().err
    asym, tok = quantized("random-llama", sym=False)
    with pytest.raises(DllmqError, match="zero point of 0"):   # v1 stores zero - 1: 0 cannot be written
        for q in quant_layers(asym).values():
            q.qzeros.zero_()
        export_quantized(asym, tok, tmp_path / "v1", "gptq")
    assert main(["export", str(out), "--format", "awq", "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "a")]) == 0
    assert "AWQ GEMM checkpoint written by dllmq" in capsys.readouterr().out
