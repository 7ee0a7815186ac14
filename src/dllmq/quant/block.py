"""What a method sees of one block while it is calibrated, and what it hands back per linear.

The calibration windows arrive in batches (several windows stacked, `[b, L, H]`), so each forward
pass over them is a few large matrix products instead of many small ones. Two ways to look at a
block's inputs:

- `run(hooks)` / `group_inputs()`: the whole block over every batch, hooks on chosen linears (what
  AWQ, SmoothQuant and DuQuant need: every group's inputs in the unquantized block).
- `sequential()`: the groups in execution order, each fed batch by batch with the inputs produced
  by the groups before it as they stand when it is reached (true-sequential calibration, GPTQ). A
  pass stops as soon as the group's input is known, and once the attention half is final its
  output (the residual stream entering the MLP) is computed once and reused by the MLP groups and
  by `outputs()`. The last group's inputs (what the down projection reads) are kept from its feed,
  so `outputs()` only runs the down projection: the block costs about one forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from dllmq.models.family import SCORE_ATTENTION, SCORE_MLP, LinearGroup, Role
from dllmq.models.modeling import Block
from dllmq.quant.online import seen_input

# Roles whose linears sit in the attention half of a block; the others are in the MLP half.
ATTENTION_HALF = (Role.ATTN_IN, Role.ATTN_OUT)


@dataclass
class QuantizedWeight:
    """A method's verdict on one linear: the weight on its quantization grid and the grid itself."""

    weight: torch.Tensor        # [out, in], dequantized values (exactly representable by the codes)
    scale: torch.Tensor         # [out, n_groups]
    zero: torch.Tensor          # [out, n_groups]
    g_idx: torch.Tensor | None  # [in] group of each input channel, None for the natural order
    error: float                # relative error the method reports for this layer
    error_kind: str             # "output" (on calibration inputs) or "weight"
    # A floating-point format (dllmq.quant.formats): `scale` holds each block's effective scale, `zero`
    # zeros, and NVFP4 its tensor scale here.
    tensor_scale: torch.Tensor | None = None


class _Reached(Exception):
    """Raised by a hook once the input it waited for has been seen: the rest of the pass is skipped."""


class BlockContext:
    """What a method sees of one block: the block (on the device), its calibration inputs (a list of
    batches `[b, L, H]`), and helpers to run it over them. `config` is the run's QuantConfig."""

    def __init__(self, block: Block, index: int, inputs: list[torch.Tensor] | None, rope, mask,
                 device: torch.device, config, weights: list[torch.Tensor] | None = None):
        self.block, self.index, self.inputs = block, index, inputs
        # per-token calibration weights ([b, L] per batch of `inputs`; None: every token weighs 1)
        self.weights = weights
        self.rope, self.mask, self.device, self.config = rope, mask, device, config
        self.family = block.family
        self._mid: list[torch.Tensor] | None = None   # residual stream after the (final) attention half
        self._heads: list[torch.Tensor] | None = None  # the out projection's inputs, to build _mid from
        self._down_in: list[torch.Tensor] | None = None  # the down projection's inputs, to build outputs() from
        self._sequential_done = False
        self._recorded: dict[Role, list[torch.Tensor]] | None = None   # group inputs from fp_outputs()
        # block linears left in full precision (--keep-fp): a method leaves their weights as they are
        self.keep_fp: frozenset[str] = frozenset(config.keep_fp_linears(block.family)) if config is not None else frozenset()

    def linear(self, name: str) -> nn.Linear:
        return self.block.get_submodule(name)

    def weighted(self, fn: Callable[[torch.Tensor, torch.Tensor | None], None]) -> Callable[[torch.Tensor], None]:
        """`fn(x, weights)` as a feed function: each call gets the next batch's token weights (a feed
        visits the batches once, in order). Without weights, `fn` itself (called with x alone)."""
        if self.weights is None:
            return fn
        batches = iter(self.weights)
        return lambda x: fn(x, next(batches))

    def quantized(self, names) -> list[str]:
        """The names among `names` that are quantized (not kept in full precision)."""
        return [n for n in names if n not in self.keep_fp]

    def run(self, hooks: dict[str, Callable[[torch.Tensor], None]] | None = None,
            keep_outputs: bool = False) -> list[torch.Tensor] | None:
        """Run the block over every calibration batch; each hook receives its linear's input."""
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
        first linear's online transform, if it has one. One pass over the block, or none when
        `fp_outputs()` has just recorded them."""
        if self._recorded is not None:
            feats, self._recorded = self._recorded, None
            return feats
        feats: dict[Role, list[torch.Tensor]] = {g.role: [] for g in self.family.groups}
        self.run({g.linears[0]: feats[g.role].append for g in self.family.groups})
        return feats

    def fp_outputs(self) -> list[torch.Tensor]:
        """The unchanged block's outputs (for a method that feeds the next block full-precision
        outputs); the same pass records every group's inputs for the next `group_inputs()` call."""
        feats: dict[Role, list[torch.Tensor]] = {g.role: [] for g in self.family.groups}
        outputs = self.run({g.linears[0]: feats[g.role].append for g in self.family.groups}, keep_outputs=True)
        self._recorded = feats
        return outputs

    # -- true-sequential calibration --------------------------------------------------------------
    def sequential(self) -> Iterator[tuple[LinearGroup, Callable[[Callable[[torch.Tensor], None]], None]]]:
        """The block's groups in execution order, each with `feed(fn)`, which calls `fn` on every
        calibration batch of the group's input (as its first linear's weight sees it) computed with
        the block as it is now. The contract: when the iteration moves past a group, its weights are
        final. That lets the context compute the attention half's output once and reuse it."""
        self._mid = self._heads = self._down_in = None
        self._sequential_done = False
        for group in self.family.groups:
            yield group, (lambda fn, group=group: self._feed(group, fn, final_before=True))
        self._sequential_done = True

    def feed_ahead(self, group: LinearGroup, fn: Callable[[torch.Tensor], None]) -> None:
        """Inside a `sequential()` pass: feed a later MLP group's input as the block stands now, before
        the groups between are final (the study's LLaDA GPTQ calibrated down on full-precision gate/up
        outputs). The attention half must be final already."""
        if group.role in ATTENTION_HALF:
            raise ValueError("only an MLP group can be fed ahead, once the attention half is final")
        self._feed(group, fn, final_before=False)

    def _feed(self, group: LinearGroup, fn: Callable[[torch.Tensor], None], final_before: bool) -> None:
        """Feed `group`'s input; `final_before`: every group before it is final (not a feed ahead)."""
        first = self.linear(group.linears[0])
        # What the out projection reads, kept to build the residual; what the down projection reads (the
        # block's last linear), kept to build the block's outputs. Only inputs computed from final groups.
        keep_heads = group.role == Role.ATTN_OUT
        keep_down = final_before and group.role == Role.MLP_OUT and len(group.linears) == 1
        self._heads = [] if keep_heads else self._heads
        self._down_in = [] if keep_down else self._down_in
        store = []

        def reached(module, args):
            if keep_heads or keep_down:
                store.append(args[0].detach())
            fn(seen_input(module, args[0].detach()))
            raise _Reached

        handle = first.register_forward_pre_hook(reached)
        try:
            with torch.no_grad():
                if group.role in ATTENTION_HALF:
                    for x in self.inputs:
                        self._until_reached(lambda: self.block.attention_residual(x.to(self.device), self.rope,
                                                                                  self.mask))
                        if keep_heads:
                            self._heads.append(store.pop().to(x.device))
                else:
                    for h in self._attention_outputs():
                        self._until_reached(lambda: self.block.mlp_residual(h.to(self.device)))
                        if keep_down:
                            self._down_in.append(store.pop().to(h.device))
        finally:
            handle.remove()

    @staticmethod
    def _until_reached(step: Callable[[], torch.Tensor]) -> None:
        try:
            step()
        except _Reached:
            return
        raise RuntimeError("a calibration hook was never reached; the family's groups do not match the block")

    def _attention_outputs(self) -> list[torch.Tensor]:
        """The residual stream after the attention half, computed once its groups are final."""
        if self._mid is None:
            with torch.no_grad():
                if self._heads and len(self._heads) == len(self.inputs):
                    # the out projection's inputs are known: only it runs again
                    self._mid = []
                    for x in self.inputs:   # kept where the inputs are (the CPU with offloaded activations)
                        self._mid.append(self.block.residual_from_heads(
                            x.to(self.device), self._heads.pop(0).to(self.device)).to(x.device))
                else:
                    self._mid = [self.block.attention_residual(x.to(self.device), self.rope, self.mask).to(x.device)
                                 for x in self.inputs]
            self._heads = None
        return self._mid

    def outputs(self) -> list[torch.Tensor]:
        """The block's outputs over the calibration batches (the next block's inputs), stored where the
        inputs are. After a completed `sequential()` pass the attention half's cached output is reused
        (the block must not have changed since); otherwise the whole block runs."""
        if not (self._sequential_done and self._mid is not None):
            return self.run(keep_outputs=True)
        kept = self._down_in if self._down_in and len(self._down_in) == len(self._mid) else None
        with torch.no_grad():
            out = []
            while self._mid:   # each batch's residual (and kept down input) is dropped as its output is made
                h = self._mid.pop(0).to(self.device)
                y = self.block.residual_from_mlp(h, kept.pop(0).to(self.device)) if kept else self.block.mlp_residual(h)
                out.append(y.to(self.inputs[len(out)].device))
        self.release()
        return out

    def release(self) -> None:
        """Drop what the context cached (the attention half's outputs, recorded group inputs)."""
        self._mid = self._heads = self._down_in = None
        self._sequential_done = False
        self._recorded = None

    def scored_output(self, group: LinearGroup) -> Callable[[torch.Tensor], torch.Tensor]:
        """The function whose output scores a scale search over `group` (the family says which)."""
        if group.scored_on == SCORE_ATTENTION:
            return lambda h: self.block.attention(h, self.rope, self.mask)
        if group.scored_on == SCORE_MLP:
            return self.block.feed_forward
        return self.linear(group.linears[0])
