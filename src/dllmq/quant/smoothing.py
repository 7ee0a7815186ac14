"""Per-channel scales moved between a group's input and its weights (SmoothQuant, AWQ, DuQuant).

Folding s divides the source's output by s (a norm's weight, or a linear's output rows) and
multiplies the group's weight columns by s, so the full-precision block computes the same function.
"""
from __future__ import annotations

import torch
from torch import nn

from dllmq.errors import DllmqError
from dllmq.models.family import LinearGroup
from dllmq.models.modeling import RMSNorm
from dllmq.quant.block import BlockContext

ALPHA_HELP = "smoothing strength: s = max|X|^alpha / max|W|^(1-alpha)"


def check_alpha(alpha: float) -> None:
    if not 0 <= alpha <= 1:
        raise DllmqError(f"--alpha must be in [0, 1], got {alpha}.")


def channel_absmax(inputs: list[torch.Tensor]) -> torch.Tensor:
    """max |x| per input channel over every calibration token (float32)."""
    return torch.stack([x.reshape(-1, x.shape[-1]).abs().amax(0).float() for x in inputs]).amax(0)


def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's s = max|X|^alpha / max|W|^(1-alpha), W's max over every linear reading X; >= 1e-5."""
    w_max = torch.cat([w.detach().abs().float() for w in weights], dim=0).amax(0)
    s = act_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


def can_fold(ctx: BlockContext, group: LinearGroup) -> bool:
    """A linear source can only carry 1/s when its outputs are exactly the group's inputs (not under
    GQA, where v's outputs are repeated across heads before the attention output reads them)."""
    source = ctx.block.get_submodule(group.source)
    if isinstance(source, nn.Linear):
        return source.out_features == ctx.linear(group.linears[0]).in_features
    return True


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
