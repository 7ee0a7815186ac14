"""Per-channel scales moved between a group's input and its weights (SmoothQuant, AWQ, DuQuant).

Folding s divides the source's output by s (a norm's weight, or a linear's output rows) and
multiplies the group's weight columns by s, so the full-precision block computes the same function.
"""
from __future__ import annotations

import torch
from torch import nn

from dllmq.errors import DllmqError
from dllmq.models.family import LinearGroup, Role
from dllmq.models.modeling import RMSNorm
from dllmq.quant.block import BlockContext
from dllmq.quant.modules import replace_module
from dllmq.quant.online import OnlineLinear

ALPHA_HELP = "smoothing strength: s = max|X|^alpha / max|W|^(1-alpha)"


def check_alpha(alpha: float) -> None:
    if not 0 <= alpha <= 1:
        raise DllmqError(f"--alpha must be in [0, 1], got {alpha}.")


def channel_absmax(inputs: list[torch.Tensor]) -> torch.Tensor:
    """max |x| per input channel over every calibration token (float32)."""
    return torch.stack([x.reshape(-1, x.shape[-1]).abs().amax(0).float() for x in inputs]).amax(0)


def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float,
                     floor: float = 1e-5) -> torch.Tensor:
    """SmoothQuant's s = max|X|^alpha / max|W|^(1-alpha), W's max over the given linears reading X
    (max|X| and max|W| floored at 1e-5, s at `floor`)."""
    w_max = torch.cat([w.detach().abs().float() for w in weights], dim=0).amax(0)
    s = act_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=max(floor, 1e-5))


def study_weight_linear(family, group: LinearGroup) -> str:
    """The one linear whose weight maxima the study's smoothing uses for a group (its `pairs` in
    DuQuant's quantize/duquant.py name q for q/k/v, up for gate/up, and the out / down projections)."""
    if group.role == Role.ATTN_IN:
        return group.linears[0]                      # q
    if group.role == Role.MLP_IN:
        return family.group(Role.MLP_OUT).source     # up (the linear whose output down reads)
    return group.linears[0]


def group_scales(ctx: BlockContext, group: LinearGroup, act_max: torch.Tensor, alpha: float, weight_max: str = "group",
                 floor: float = 1e-5) -> torch.Tensor:
    """A group's s, with max|W| over all its linears (`group`) or the one the study's code names (`study`)."""
    names = [study_weight_linear(ctx.family, group)] if weight_max == "study" else group.linears
    return smoothing_scales(act_max, [ctx.linear(n).weight for n in names], alpha, floor)


class InputScale(nn.Module):
    """x -> x / s at run time, for a smoothing pair whose source cannot carry 1/s (under GQA, v's
    outputs are repeated across heads before the out projection reads them). A buffer, so a saved
    model keeps it."""

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("scale", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale.to(x.dtype)

    def extra_repr(self) -> str:
        return f"n={self.scale.numel()}"


def source_carries_scales(block: nn.Module, group: LinearGroup) -> bool:
    """Whether the group's source can take 1/s: a norm always, a linear only when its outputs are exactly
    the group's inputs (not under GQA, where v's outputs are repeated across heads first)."""
    source = block.get_submodule(group.source)
    if hasattr(source, "out_features"):   # a linear, full precision or already quantized (a model being loaded)
        return source.out_features == block.get_submodule(group.linears[0]).in_features
    return True


def divide_online(ctx: BlockContext, group: LinearGroup, s: torch.Tensor) -> None:
    """Group weights * s and the group's input / s at run time (an InputScale before each linear's
    activation quantizer): the full-precision function is unchanged, as with fold_scales."""
    s = s.float()   # the stored scale (float32, as saved) is the one the weights are multiplied by
    for name in group.linears:
        lin = OnlineLinear.wrap(ctx.linear(name))
        with torch.no_grad():
            lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
        divide = InputScale(lin.in_features).to(lin.weight.device)
        divide.scale.copy_(s)
        lin.input_transform = divide
        replace_module(ctx.block, name, lin)


def can_fold(ctx: BlockContext, group: LinearGroup) -> bool:
    """A linear source can only carry 1/s when its outputs are exactly the group's inputs (not under
    GQA, where v's outputs are repeated across heads before the attention output reads them)."""
    return source_carries_scales(ctx.block, group)


def fold_scales(ctx: BlockContext, group: LinearGroup, s: torch.Tensor) -> None:
    """source output / s, group weights * s: the full-precision function is unchanged."""
    source = ctx.block.get_submodule(group.source)
    with torch.no_grad():
        if isinstance(source, RMSNorm):
            source.weight.div_(s.to(source.weight.dtype))
        else:
            source.weight.div_(s.to(source.weight.dtype)[:, None])
            if source.bias is not None:
                source.bias.div_(s.to(source.bias.dtype))
        for name in group.linears:
            w = ctx.linear(name).weight
            w.mul_(s.to(w.dtype)[None, :])
