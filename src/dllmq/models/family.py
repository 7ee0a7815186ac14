"""The family description: the one place that knows where things sit in an architecture.

Every method downstream (quantization, profiling, evaluation) asks a `Family` for module paths
instead of naming them, so adding an architecture is one file and one registry entry.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one block that read the same input and are calibrated together.

    `source` is the module whose output feeds them: a norm (scales fold into its weight) or,
    for the attention output and down projections, the linear whose output they consume.
    """

    name: str                 # "qkv", "attn_out", "gate_up", "down"
    linears: tuple[str, ...]  # paths relative to the block, in execution order
    source: str               # path relative to the block


@dataclass(frozen=True)
class Family:
    """Where an architecture keeps its parts and how its logits are read.

    Dimensions (heads, FFN size, RoPE) live in the model's `ModelConfig`; this object holds the
    layout, which is the same for every size of a family.
    """

    name: str                           # "llada", "dream", "llama"
    model_types: tuple[str, ...]        # config.json `model_type` values this family reads
    embed: str                          # path of the token embedding from the model root
    blocks: str                         # path of the ModuleList of decoder blocks
    final_norm: str
    lm_head: str
    attn_norm: str                      # paths relative to a block
    ffn_norm: str
    groups: tuple[LinearGroup, ...]     # in execution (true-sequential calibration) order
    causal: bool                        # False for diffusion models (bidirectional attention)
    shift_logits: bool                  # True when token i is predicted at position i-1 (Dream)

    @property
    def is_diffusion(self) -> bool:
        return not self.causal

    @property
    def block_linears(self) -> tuple[str, ...]:
        """Every linear of a block, in execution order."""
        return tuple(name for group in self.groups for name in group.linears)

    def group(self, name: str) -> LinearGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"family {self.name!r} has no linear group {name!r}")
