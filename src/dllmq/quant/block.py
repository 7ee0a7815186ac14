"""What a method sees of one block while it is calibrated, and what it hands back per linear."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from dllmq.models.family import SCORE_ATTENTION, SCORE_MLP, LinearGroup, Role
from dllmq.models.modeling import Block
from dllmq.quant.online import seen_input


@dataclass
class QuantizedWeight:
    """A method's verdict on one linear: the weight on its quantization grid and the grid itself."""

    weight: torch.Tensor        # [out, in], dequantized values (exactly representable by the codes)
    scale: torch.Tensor         # [out, n_groups]
    zero: torch.Tensor          # [out, n_groups]
    g_idx: torch.Tensor | None  # [in] group of each input channel, None for the natural order
    error: float                # relative error the method reports for this layer
    error_kind: str             # "output" (on calibration inputs) or "weight"


class BlockContext:
    """What a method sees of one block: the block (on the device), its calibration inputs, and helpers
    to run it over them with hooks on chosen linears. `config` is the run's QuantConfig."""

    def __init__(self, block: Block, index: int, inputs: list[torch.Tensor] | None, rope, mask,
                 device: torch.device, config):
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

    def group_inputs(self) -> dict[Role, list[torch.Tensor]]:
        """Every group's calibration inputs (its linears share one), as the weights see them: after the
        first linear's online transform, if it has one. One pass over the block."""
        feats: dict[Role, list[torch.Tensor]] = {g.role: [] for g in self.family.groups}
        self.run({g.linears[0]: feats[g.role].append for g in self.family.groups})
        return feats

    def scored_output(self, group: LinearGroup) -> Callable[[torch.Tensor], torch.Tensor]:
        """The function whose output scores a scale search over `group` (the family says which)."""
        if group.scored_on == SCORE_ATTENTION:
            return lambda h: self.block.attention(h, self.rope, self.mask)
        if group.scored_on == SCORE_MLP:
            return self.block.feed_forward
        return self.linear(group.linears[0])
