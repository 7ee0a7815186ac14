"""Block-by-block calibration: the loop that lets an 8B model be quantized on one modest GPU.

Capture the inputs of block 0 for the calibration windows, then for each block: move it to the
device, let the method observe and quantize it (true-sequential inside the block), swap its linears
for QuantLinear modules, compute its outputs as the next block's inputs, move it back. Peak device
memory is one block plus the calibration activations (which may stay on the CPU instead).
"""
from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from dllmq.models.modeling import TransformerLM
from dllmq.quant.block import BlockContext, QuantizedWeight
from dllmq.quant.methods.base import Method
from dllmq.quant.modules import replace_module
from dllmq.quant.qlinear import QuantLinear
from dllmq.quant.specs import WeightSpec

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    name: str
    error: float
    error_kind: str


@dataclass
class QuantReport:
    method: str
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    peak_device_bytes: int | None = None
    layers: list[LayerReport] = field(default_factory=list)


def capture_block_inputs(model: TransformerLM, calib_ids: torch.Tensor, device: torch.device, store: torch.device):
    """Block-0 inputs, one [1, L, H] tensor per calibration window, plus the shared rope tables and mask."""
    inputs = []
    with torch.no_grad():
        for row in calib_ids:
            hidden, rope, mask = model.block_inputs(row[None].to(model.get_embedding().weight.device))
            inputs.append(hidden.to(store))
    rope = tuple(t.to(device) for t in rope)
    return inputs, rope, None if mask is None else mask.to(device)


def to_quant_linear(linear: nn.Linear, result: QuantizedWeight, spec: WeightSpec) -> QuantLinear:
    original = linear.weight.data
    linear.weight.data = result.weight.to(original.dtype)
    try:
        q = QuantLinear.from_float(linear, result.scale, result.zero, spec.bits, spec.group_size, g_idx=result.g_idx)
    finally:
        linear.weight.data = original
    q.input_transform = getattr(linear, "input_transform", None)  # online transforms travel along
    q.act_quantizer = getattr(linear, "act_quantizer", None)
    return q


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def quantize_model(model: TransformerLM, method: Method, calib_ids: torch.Tensor | None = None,
                   device: str | torch.device = "cpu", offload_activations: bool = False,
                   progress: bool = True) -> QuantReport:
    """Quantize every block linear of `model` in place; embeddings, norms and the LM head stay as they are."""
    device = torch.device(device)
    home = next(model.parameters()).device
    store = torch.device("cpu") if offload_activations else device
    report = QuantReport(method=method.name)
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    method.prepare_model(model)
    inputs = rope = mask = None
    if calib_ids is not None:
        inputs, rope, mask = capture_block_inputs(model, calib_ids, device, store)
    blocks = model.get_blocks()
    bar = tqdm(range(len(blocks)), desc=f"{method.name} block", unit="block", disable=not progress, dynamic_ncols=True)
    for i in bar:
        block = blocks[i].to(device)
        ctx = BlockContext(block, i, inputs, rope, mask, device, method.config)
        fp_outputs = None
        if inputs is not None and not method.propagate_quantized:
            fp_outputs = ctx.run(keep_outputs=True)
        results = method.quantize_block(ctx)
        for name in block.family.block_linears:  # execution order, so the report reads top to bottom
            if name in results:
                replace_module(block, name, to_quant_linear(ctx.linear(name), results[name], method.config.weight))
                report.layers.append(LayerReport(f"{model.family.blocks}.{i}.{name}", results[name].error,
                                                 results[name].error_kind))
        method.build_runtime(block)
        if inputs is not None:
            inputs = fp_outputs if fp_outputs is not None else ctx.run(keep_outputs=True)
        blocks[i] = block.to(home)
        bar.set_postfix_str(f"{method.name}, last error {report.layers[-1].error:.3g}" if report.layers else method.name)
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = _rss_peak()
    if device.type == "cuda":
        report.peak_device_bytes = torch.cuda.max_memory_allocated(device)
    return report
