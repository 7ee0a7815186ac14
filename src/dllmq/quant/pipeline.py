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
from dllmq.quant.qlinear_fp import FPQuantLinear
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


# Calibration windows are run through a block this many tokens at a time (whole windows, at least
# one): large enough for efficient matrix products, small enough that a batch's intermediate
# activations stay a fraction of the stored calibration activations.
CALIB_BATCH_TOKENS = 4096


def capture_block_inputs(model: TransformerLM, calib_ids: torch.Tensor, device: torch.device, store: torch.device,
                         batch_tokens: int = CALIB_BATCH_TOKENS):
    """Block-0 inputs as a list of batches [b, L, H] (b windows each, the last batch may be smaller),
    plus the shared rope tables and mask."""
    inputs = []
    per_batch = max(1, batch_tokens // calib_ids.shape[1])
    embed_device = model.get_embedding().weight.device
    with torch.no_grad():
        for rows in calib_ids.split(per_batch):
            hidden, rope, mask = model.block_inputs(rows.to(embed_device))
            inputs.append(hidden.to(store))
    # every batch shares the tables of its first row (positions 0..L-1 in every window)
    rope = tuple(t[:1].to(device) for t in rope)
    return inputs, rope, None if mask is None else mask.to(device)


def to_quant_linear(linear: nn.Linear, result: QuantizedWeight, spec: WeightSpec) -> QuantLinear | FPQuantLinear:
    if spec.fmt.is_float:
        q = FPQuantLinear.from_values(linear, result.weight.float(), result.scale, spec.format, result.tensor_scale)
        q.input_transform = getattr(linear, "input_transform", None)
        q.act_quantizer = getattr(linear, "act_quantizer", None)
        return q
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
                   progress: bool = True, batch_tokens: int = CALIB_BATCH_TOKENS,
                   token_weights: torch.Tensor | None = None) -> QuantReport:
    """Quantize every block linear of `model` in place; embeddings, norms and the LM head stay as they are.
    The calibration windows go through each block `batch_tokens` tokens (whole windows) at a time; the
    result does not depend on it. `token_weights` [n, L] weigh the calibration tokens (--weighting)."""
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
        inputs, rope, mask = capture_block_inputs(model, calib_ids, device, store, batch_tokens)
    weights = None
    if token_weights is not None:   # split as the windows were, so batch i's weights sit beside inputs[i]
        weights = [w.to(store) for w in token_weights.float().split([x.shape[0] for x in inputs])]
    blocks = model.get_blocks()
    bar = tqdm(range(len(blocks)), desc=f"{method.name} block", unit="block", disable=not progress, dynamic_ncols=True)
    for i in bar:
        block = blocks[i].to(device)
        ctx = BlockContext(block, i, inputs, rope, mask, device, method.config, weights)
        fp_outputs = None
        if inputs is not None and not method.propagate_quantized:
            fp_outputs = ctx.fp_outputs()
        results = {name: r for name, r in method.quantize_block(ctx).items() if name not in ctx.keep_fp}
        next_inputs = fp_outputs
        if inputs is not None and next_inputs is None and not method.config.weight_activation:
            # weight-only: the quantized block computes its linears with the dequantized weights, so
            # the next block's inputs come from the block holding them (reusing what calibration cached)
            for name, result in results.items():
                ctx.linear(name).weight.data = result.weight.to(ctx.linear(name).weight.dtype)
            next_inputs = ctx.outputs()
        ctx.release()
        for name in block.family.block_linears:  # execution order, so the report reads top to bottom
            if name in results:
                replace_module(block, name, to_quant_linear(ctx.linear(name), results[name], method.config.weight))
                report.layers.append(LayerReport(f"{model.family.blocks}.{i}.{name}", results[name].error,
                                                 results[name].error_kind))
        method.build_runtime(block)
        if inputs is not None:
            # weight-activation: the activation quantizers build_runtime attached take part
            inputs = next_inputs if next_inputs is not None else ctx.run(keep_outputs=True)
        blocks[i] = block.to(home)
        bar.set_postfix_str(f"{method.name}, last error {report.layers[-1].error:.3g}" if report.layers else method.name)
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = _rss_peak()
    if device.type == "cuda":
        report.peak_device_bytes = torch.cuda.max_memory_allocated(device)
    return report
