"""Streaming conversion: `load_model(..., backend="kernel")` builds each kernel layer from the checkpoint's
tensors as they are read. The model it gives must be today's two-step result (load with the fake backend,
then set_backend(model, "kernel")) buffer for buffer, with the same logits, the same fallbacks and the same
saved files. Its peak memory is measured in benchmarks/streaming_load.py, not here."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import dllmq
from dllmq.models.loading import Stream, load_checkpoint, save_model
from dllmq.models.random_models import random_model
from dllmq.models.safetensors_io import load_tensors
from dllmq.quant import QuantConfig, quantize, save_quantized
from dllmq.quant.backend import BackendReport, KernelLinear, backend_report, kernel_stream, set_backend
from dllmq.quant.format import prepare_quantized
from dllmq.quant.qlinear import QuantLinear
from dllmq.quant.qlinear_fp import FPQuantLinear

FAST = dict(nsamples=4, seqlen=32)
CASES = {   # settings, the kernel every quantized linear runs on this CPU (or the count per kernel)
    "rtn-W8A8": (dict(method="rtn", wbits=8, abits=8), "int8_dynamic"),
    "smoothquant-W8A8": (dict(method="smoothquant", wbits=8, abits=8, **FAST), "int8_dynamic"),
    "quarot-W8A8": (dict(method="quarot", wbits=8, abits=8, weight_method="rtn"), "int8_dynamic"),
    "gptq-W4A16-g128": (dict(method="gptq", wbits=4, group_size=128, **FAST), "int4_weight"),
    "gptq-W4A16-g32-act-order": (dict(method="gptq", wbits=4, group_size=32, act_order=True, static_groups=False,
                                      **FAST), "int4_weight"),
    "rtn-W8A16": (dict(method="rtn", wbits=8, group_size=-1), "int8_weight"),
    "rtn-W8A8-fp8": (dict(method="rtn", wformat="fp8", aformat="fp8"), "fake"),   # no FP8 kernel on a CPU
    # grouped weights with quantized activations have no kernel; random-llada's 64-wide inputs are one group
    "rtn-W4A4-g128": (dict(method="rtn", wbits=4, abits=4, group_size=128), {"int8_dynamic": 12, "fake": 2}),
}
_SAVED: dict[str, Path] = {}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> a saved quantized random-llada (made once per module)."""
    def get(case: str) -> Path:
        if case not in _SAVED:
            model, tok = random_model("random-llada", seed=3)
            quantize(model, tok, QuantConfig(**CASES[case][0]), progress=False)
            _SAVED[case] = save_quantized(model, tok, tmp_path_factory.mktemp(case) / "q")
        return _SAVED[case]
    return get


def _plain_state(module: nn.Module) -> dict:
    """A module's own buffers, parameters and plain attributes (not its submodules)."""
    out = {f"buffer {k}": v for k, v in module._buffers.items()}
    out.update({f"param {k}": v for k, v in module._parameters.items()})
    out.update({f"attr {k}": v for k, v in vars(module).items() if not k.startswith("_") and k != "training"})
    return out


def assert_same_layers(a: nn.Module, b: nn.Module) -> None:
    """Module for module: the same types, and every buffer, parameter and attribute equal (torch.equal and
    the same dtype for tensors)."""
    mods_a, mods_b = dict(a.named_modules()), dict(b.named_modules())
    assert list(mods_a) == list(mods_b)
    for path, ma in mods_a.items():
        mb = mods_b[path]
        assert type(ma) is type(mb), path
        sa, sb = _plain_state(ma), _plain_state(mb)
        assert sa.keys() == sb.keys(), path
        for key, va in sa.items():
            vb = sb[key]
            if isinstance(va, torch.Tensor):
                assert isinstance(vb, torch.Tensor) and va.dtype == vb.dtype and va.device == vb.device, (path, key)
                assert torch.equal(va, vb), (path, key)
            else:
                assert va == vb, (path, key)


def _two_step(path, **kw):
    """Today's way: load with fake quantization, then swap the layers."""
    model = dllmq.load_model(path, backend="fake", **kw).model
    report = set_backend(model, "kernel")
    return model, report


def _ids():
    return torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_layers_equal_load_then_set_backend(case, saved):
    path = saved(case)
    streamed = dllmq.load_model(path, backend="kernel").model
    reference, counts = _two_step(path)
    assert_same_layers(streamed, reference)
    expected = CASES[case][1]
    assert backend_report(streamed).counts() == counts == (expected if isinstance(expected, dict) else {expected: 14})
    assert backend_report(streamed).reasons == backend_report(reference).reasons   # the same fallbacks, same words
    with torch.no_grad():
        assert torch.equal(streamed(_ids()), reference(_ids()))


@pytest.mark.parametrize("case", ["gptq-W4A16-g32-act-order", "quarot-W8A8", "rtn-W8A8-fp8"])
def test_streamed_model_saves_the_same_files(case, saved, tmp_path):
    path = saved(case)
    streamed = dllmq.load_model(path, backend="kernel")
    reference, _ = _two_step(path)
    a = save_quantized(streamed.model, streamed.tokenizer, tmp_path / "a")
    b = save_quantized(reference, streamed.tokenizer, tmp_path / "b")
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # and it is the checkpoint it came from
    assert (a / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()


@pytest.mark.parametrize("case", ["rtn-W8A8", "gptq-W4A16-g128"])
def test_sharded_checkpoint_streams(case, saved, tmp_path):
    fake = dllmq.load_model(saved(case), backend="fake")
    sharded = save_model(fake.model, fake.tokenizer, tmp_path / "sharded", max_shard_bytes=200_000)
    assert len(list(sharded.glob("*.safetensors"))) > 2
    streamed = dllmq.load_model(sharded, backend="kernel").model
    reference, _ = _two_step(saved(case))
    assert_same_layers(streamed, reference)
    with torch.no_grad():
        assert torch.equal(streamed(_ids()), reference(_ids()))


def test_bf16_load_streams_to_the_same_layers(saved):
    path = saved("rtn-W8A8")
    streamed = dllmq.load_model(path, backend="kernel", dtype="bfloat16").model
    reference, _ = _two_step(path, dtype="bfloat16")
    assert_same_layers(streamed, reference)


def test_layers_are_converted_one_at_a_time(saved):
    """When a layer is handed over for conversion, every later quantized linear still has no data (meta)
    and every earlier one is already converted: at most one layer's checkpoint tensors are held."""
    path = saved("rtn-W8A8")
    model_box, order = {}, []
    report = BackendReport("kernel")
    inner = kernel_stream(report)

    def prepare(model, raw, tensors):
        prepare_quantized(model, raw, tensors)
        model_box["model"] = model

    def convert(name, module):
        model = model_box["model"]
        assert not module.qweight.is_meta
        for other_name, other in model.named_modules():
            if other is module:
                continue
            if isinstance(other, (QuantLinear, FPQuantLinear)):
                assert other.qweight.is_meta, (name, other_name)
        order.append(name)
        return inner.convert(name, module)

    stream = Stream(claims=inner.claims, convert=convert)
    model = load_checkpoint(path, prepare=prepare, stream=stream)
    assert len(order) == 14 and report.counts() == {"int8_dynamic": 14}
    assert all(isinstance(model.get_submodule(n), KernelLinear) for n in order)


def test_streamed_tensors_are_read_without_the_map(saved):
    """read_unmapped returns the file's bytes in memory of its own; a tensor a loader hook replaced comes back as is."""
    path = saved("rtn-W8A8")
    tensors = load_tensors(path)
    name = next(n for n in tensors if n.endswith(".qweight"))
    copy = tensors.read_unmapped(name)
    assert torch.equal(copy, tensors[name]) and copy.dtype == tensors[name].dtype
    assert copy.untyped_storage().data_ptr() != tensors[name].untyped_storage().data_ptr()
    replaced = torch.zeros_like(copy)
    tensors[name] = replaced
    assert tensors.read_unmapped(name) is replaced


def test_full_precision_checkpoint_with_kernel_backend(tmp_path):
    model, tok = random_model("random-llada", seed=2)
    out = save_model(model, tok, tmp_path / "fp")
    loaded = dllmq.load_model(out, backend="kernel").model
    assert set_backend(loaded, "kernel") == {}
    with torch.no_grad():
        assert torch.equal(loaded(_ids()), model(_ids()))


def test_unknown_backend_is_one_sentence():
    with pytest.raises(dllmq.errors.DllmqError, match="kernel or fake"):
        dllmq.load_model("random-llada", backend="int3")


def test_keep_fp_linears_stay_plain_and_stream(tmp_path):
    model, tok = random_model("random-llada", seed=4)
    quantize(model, tok, QuantConfig(method="rtn", wbits=4, group_size=32, keep_fp=["ff_out"]), progress=False)
    path = save_quantized(model, tok, tmp_path / "q")
    assert "ff_out" not in json.dumps(json.loads((path / "config.json").read_text())
                                      ["quantization_config"]["modules_in_block_to_quantize"])
    streamed = dllmq.load_model(path, backend="kernel").model
    reference, counts = _two_step(path)
    assert counts == {"int4_weight": 12}
    assert_same_layers(streamed, reference)


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_another_tools_checkpoint_streams(fmt, saved, tmp_path):
    """A foreign checkpoint's tensors are converted by the prepare hook; those stream as they are."""
    from dllmq.quant.interop.export import export_quantized
    fake = dllmq.load_model(saved("gptq-W4A16-g128"), backend="fake")
    exported = export_quantized(fake.model, fake.tokenizer, tmp_path / "e", fmt)
    streamed = dllmq.load_model(exported, backend="kernel").model
    reference, counts = _two_step(exported)
    assert counts == {"int4_weight": 14}
    assert_same_layers(streamed, reference)
    with torch.no_grad():
        assert torch.equal(streamed(_ids()), reference(_ids()))


@pytest.mark.parametrize("argv", [["generate", "--prompt", "Hello", "--gen-length", "8", "--steps", "2"],
                                  ["bench", "--seq-len", "32", "--gen-length", "8", "--steps", "2", "--repeats", "1",
                                   "--backend", "both"]])
def test_cli_kernel_backend_loads_by_streaming(argv, saved, monkeypatch, capsys):
    """`dllmq generate` (kernel by default) and `dllmq bench` build their kernel layers while loading."""
    from dllmq.cli import main
    from dllmq.quant import backend
    converted = []
    real = backend.kernel_stream

    def spying_stream(report=None):
        stream = real(report)
        return Stream(stream.claims, lambda path, m: converted.append(path) or stream.convert(path, m))

    monkeypatch.setattr(backend, "kernel_stream", spying_stream)
    assert main([argv[0], str(saved("rtn-W8A8")), *argv[1:]]) == 0
    assert len(converted) == 14
    capsys.readouterr()


@pytest.mark.parametrize("n,k", [(256, 8192), (1024, 4096), (192, 96)])
def test_chunked_conversion_equals_whole_layer(n, k):
    """Conversion works a chunk of rows at a time to bound its temporaries; the result is the whole-layer one."""
    from dllmq.quant import kernels as K
    g = torch.Generator().manual_seed(n + k)
    layout = K.int4_layout()
    if layout is not None:
        codes4 = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
        assert torch.equal(K.pack_int4(codes4, layout.block), K.pack_int4(codes4))
    for bits in (8, 5):
        codes = torch.randint(0, 2 ** bits, (k, n), dtype=torch.uint8, generator=g).t()   # [N, K], strided
        zero = torch.randint(0, 2 ** bits, (n,), dtype=torch.uint8, generator=g)
        weight, w_zero, w_sum = K.int8_weight_parts(codes, zero, bits)
        q, z = codes.long(), zero.long()
        shift = z if bits <= 7 else torch.full_like(z, 128)
        assert torch.equal(weight.long(), q - shift[:, None]) and weight.dtype == torch.int8
        assert torch.equal(w_sum.long(), (q - z[:, None]).sum(dim=1)) and w_sum.dtype == torch.int32
        assert (w_zero is None) if bits <= 7 else torch.equal(w_zero.long(), z - 128)
