"""A foreign checkpoint's weight quantization, in dllmq's terms."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dllmq.quant.primitives import group_index


@dataclass(frozen=True)
class ForeignScheme:
    """A foreign checkpoint's weight quantization, in dllmq's terms."""

    format: str        # what the files are, e.g. "GPTQ v1", "AWQ GEMM", "compressed-tensors pack-quantized"
    method: str        # the registered method whose config stands for it (the algorithm is often unrecorded)
    bits: int
    group_size: int    # -1 = one group per output channel
    sym: bool
    act_order: bool
    quantizer: str     # who wrote it, as the checkpoint says (meta.quantizer), or the format's usual tool

    def describe(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"group {self.group_size}"
        order = ", act-order" if self.act_order else ""
        return (f"{self.format} checkpoint written by {self.quantizer}: W{self.bits}A16, {group} weights "
                f"({'symmetric' if self.sym else 'asymmetric'}{order})")


def quantizer_of(qc: dict, default: str) -> str:
    """Who wrote a checkpoint: its `meta.quantizer` entry (a name or a list of them), else `default`."""
    found = (qc.get("meta") or {}).get("quantizer")
    if isinstance(found, list):
        found = ", ".join(str(x) for x in found)
    return str(found) if found else default


def natural_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """Input channel i in group i // group_size (one group for per-channel)."""
    return group_index(in_features, in_features if group_size == -1 else group_size).to(torch.int32)
