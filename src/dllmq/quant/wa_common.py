"""What the weight-activation methods share: smoothing scales, the quantizers they attach, and
per-channel weight rounding."""
from __future__ import annotations

import torch
from torch import nn

from dllmq.models.modeling import Block
from dllmq.quant.activations import ActQuantizer, KVQuantizer
from dllmq.quant.config import QuantConfig
from dllmq.quant.pipeline import BlockContext, QuantizedWeight
from dllmq.quant.rtn import rtn_weight


def channel_absmax(inputs: list[torch.Tensor]) -> torch.Tensor:
    """max |x| per input channel over every calibration token (float32)."""
    return torch.stack([x.reshape(-1, x.shape[-1]).abs().amax(0).float() for x in inputs]).amax(0)


def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's s = max|X|^alpha / max|W|^(1-alpha), W's max over every linear reading X; >= 1e-5."""
    w_max = torch.cat([w.detach().abs().float() for w in weights], dim=0).amax(0)
    s = act_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


def group_inputs(ctx: BlockContext) -> dict[str, list[torch.Tensor]]:
    """The calibration inputs of each linear group (keyed by its first linear), as the weights see them."""
    feats: dict[str, list[torch.Tensor]] = {g.linears[0]: [] for g in ctx.family.groups}
    ctx.run({name: feats[name].append for name in feats})
    return feats


def round_weights(ctx: BlockContext, config: QuantConfig) -> dict[str, QuantizedWeight]:
    return {name: rtn_weight(ctx.linear(name).weight, config.wbits, config.group_size, config.sym,
                             config.weight_clip or 1.0)
            for name in ctx.family.block_linears}


def attach_quantizers(block: Block, config: QuantConfig, rotate_qk: bool = False) -> None:
    """Per-token activation quantizers on every block linear, and the K/V quantizer when asked."""
    for name in block.family.block_linears:
        linear = block.get_submodule(name)
        linear.act_quantizer = ActQuantizer(config.abits, symmetric=bool(config.act_sym),
                                            clip_ratio=config.act_clip or 1.0)
    if config.kv_bits < 16:
        block.kv_hook = KVQuantizer(config.kv_bits, config.kv_group_size, config.kv_clip, rotate_qk=rotate_qk)


def scale_weight_columns(linear: nn.Linear, s: torch.Tensor) -> None:
    with torch.no_grad():
        linear.weight.mul_(s.to(linear.weight.dtype)[None, :])
