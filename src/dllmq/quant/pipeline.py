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
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from dllmq.models.modeling import Block, TransformerLM
from dllmq.quant.config import QuantConfig
from dllmq.quant.online import seen_input
from dllmq.quant.qlinear import QuantLinear

log = logging.getLogger(__name__)


@dataclass
class QuantizedWeight:
    """A method's verdict on one linear: the weight on its quantization grid and the grid itself."""

    weight: torch.Tensor        # [out, in], dequantized values (exactly representable by the codes)
    scale: torch.Tensor         # [out, n_groups]
    zero: torch.Tensor          # [out, n_groups]
    g_idx: torch.Tensor | None  # [in] group of each input channel, None for the natural order
    error: float                # relative error the method reports for this layer
    error_kind: str             # "output" (on calibration inputs) or "weight"


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


class BlockContext:
    """What a method sees of one block: the block (on the device), its calibration inputs, and helpers
    to run it over them with hooks on chosen linears."""

    def __init__(self, block: Block, index: int, inputs: list[torch.Tensor] | None, rope, mask,
                 device: torch.device, config: QuantConfig):
        self.block, self.index, self.inputs = block, index, inputs
        self.rope, self.mask, self.device, self.config = rope, mask, device, config
        self.family = block.family

    def linear(self, name: str) -> nn.Linear:
        return self.block.get_submodule(name)

    def run(self, hooks: dict[str, Callable[[torch.Tensor], None]] | None = None,
            keep_outputs: bool = False) -> list[torch.Tensor] | None:
        """Run the block over every calibration input; each hook receives its linear's input."""
        handles = [self.linear(name).register_forward_hook(
                       lambda m, args, out, fn=fn: fn(seen_input(m, args[0].detach())))
                   for name, fn in (hooks or {}).items()]
        outputs = []
        try:
            with torch.no_grad():
                for x in self.inputs:
                    y = self.block(x.to(self.device), self.rope, self.mask)
                    if keep_outputs:
                        outputs.append(y.to(x.device))
        finally:
            for h in handles:
                h.remove()
        return outputs if keep_outputs else None


class Method:
    """A quantization method: observe a block's calibration inputs, transform, quantize.

    `propagate_quantized`: whether the next block is fed this block's quantized outputs (GPTQ's
    reference does) or its full-precision ones (AWQ's reference does).
    """

    name = "base"
    propagate_quantized = True

    def __init__(self, config: QuantConfig):
        self.config = config

    def prepare_model(self, model: TransformerLM) -> None:
        """Model-level work before calibration (QuaRot's rotation of the residual stream)."""

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        raise NotImplementedError

    def finalize_block(self, block: Block) -> None:
        """After the block's linears are quantized (weight-activation methods attach quantizers here)."""


def capture_block_inputs(model: TransformerLM, calib_ids: torch.Tensor, device: torch.device, store: torch.device):
    """Block-0 inputs, one [1, L, H] tensor per calibration window, plus the shared rope tables and mask."""
    inputs = []
    with torch.no_grad():
        for row in calib_ids:
            hidden, rope, mask = model.block_inputs(row[None].to(model.get_embedding().weight.device))
            inputs.append(hidden.to(store))
    rope = tuple(t.to(device) for t in rope)
    return inputs, rope, None if mask is None else mask.to(device)


def replace_linear(block: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    setattr(parent, leaf, new)


def to_quant_linear(linear: nn.Linear, result: QuantizedWeight, config: QuantConfig) -> QuantLinear:
    original = linear.weight.data
    linear.weight.data = result.weight.to(original.dtype)
    try:
        q = QuantLinear.from_float(linear, result.scale, result.zero, config.wbits, config.group_size,
                                   g_idx=result.g_idx)
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
                replace_linear(block, name, to_quant_linear(ctx.linear(name), results[name], method.config))
                report.layers.append(LayerReport(f"{model.family.blocks}.{i}.{name}", results[name].error,
                                                 results[name].error_kind))
        method.finalize_block(block)
        if inputs is not None:
            inputs = fp_outputs if fp_outputs is not None else ctx.run(keep_outputs=True)
        blocks[i] = block.to(home)
        bar.set_postfix_str(f"{method.name}, last error {report.layers[-1].error:.3g}" if report.layers else method.name)
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = _rss_peak()
    if device.type == "cuda":
        report.peak_device_bytes = torch.cuda.max_memory_allocated(device)
    return report
