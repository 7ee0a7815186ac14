"""AWQ (Lin et al., 2024), as the reference implementation runs it.

For each group of linears that share an input (q/k/v after the attention norm, attention out after
v, gate/up after the FFN norm, down after up): s = mean|x|^alpha per input channel (optionally
divided by mean normalised |w|^(1-alpha), "duo scaling"), normalised by sqrt(max s * min s), alpha
searched over a grid of 20 in [0, 1) to minimise the MSE of the group's block output (the attention
output for q/k/v, the MLP output for gate/up, the layer's own output otherwise) with the weights
fake-quantized. The best s is folded into the preceding norm or linear (1/s) and the group's weights
(s), which leaves the full-precision model unchanged. Then a clipping search (20 points, shrink down
to 0.5, not for q/k) and round-to-nearest. v -> out is skipped when shapes differ (GQA). The next
block is fed full-precision outputs, as in the reference.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dllmq.models.modeling import RMSNorm
from dllmq.quant.pipeline import BlockContext, Method, QuantizedWeight
from dllmq.quant.primitives import QuantSpec, fake_quantize
from dllmq.quant.rtn import rtn_weight

_NO_CLIP = ("q_proj", "k_proj")


def group_fake_quant(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """RTN fake quantization of a weight matrix, group-wise along the input dim."""
    return rtn_weight(w, bits, group_size, sym).weight.to(w.dtype)


def weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over output rows of |w| normalised by its group's max |w| (duo scaling's w statistic)."""
    w = torch.cat([x.float() for x in weights], dim=0).abs()
    g = w.shape[1] if group_size == -1 else group_size
    pad = (-w.shape[1]) % g
    wp = F.pad(w, (0, pad)).reshape(w.shape[0], -1, g)
    wp = wp / (wp.amax(dim=-1, keepdim=True) + 1e-6)
    return wp.reshape(w.shape[0], -1)[:, : w.shape[1]].mean(0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, ratio: float) -> torch.Tensor:
    if w_mean is None:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    else:
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


class AWQ(Method):
    name = "awq"
    propagate_quantized = False

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        c = self.config
        groups = [g for g in ctx.family.groups if self._scalable(ctx, g)]
        feats = self._input_features(ctx)
        # search every group on the original block, then fold all scales (as the reference does)
        chosen = [(group, self.search_scale(ctx, group, feats[group.linears[0]])) for group in groups]
        for group, (scales, _) in chosen:
            fold_scales(ctx, group, scales)
            for name in group.linears:
                feats[name] = [x / scales.to(x.dtype) for x in feats[name]]
        results = {}
        for group in ctx.family.groups:
            for name in group.linears:
                linear = ctx.linear(name)
                x = _token_sample(feats[name], c.awq_clip_tokens)
                if c.awq_clip and not name.endswith(_NO_CLIP):
                    clip_weight(linear, x, c.wbits, c.group_size, c.sym, c.awq_grid, c.awq_max_shrink)
                q = rtn_weight(linear.weight, c.wbits, c.group_size, c.sym)
                q.error = _relative_output_error(linear.weight.float(), q.weight, x)
                q.error_kind = "output"
                results[name] = q
        return results

    # -- steps ---------------------------------------------------------------------------------
    @staticmethod
    def _scalable(ctx: BlockContext, group) -> bool:
        """A linear source can only carry 1/s when its outputs are exactly the group's inputs."""
        source = ctx.block.get_submodule(group.source)
        if isinstance(source, nn.Linear):
            return source.out_features == ctx.linear(group.linears[0]).in_features
        return True

    @staticmethod
    def _input_features(ctx: BlockContext) -> dict[str, list[torch.Tensor]]:
        feats: dict[str, list[torch.Tensor]] = {name: [] for g in ctx.family.groups for name in g.linears}
        firsts = {g.linears[0]: g for g in ctx.family.groups}
        ctx.run({name: feats[name].append for name in firsts})
        for g in ctx.family.groups:  # linears of a group share one input
            for name in g.linears[1:]:
                feats[name] = feats[g.linears[0]]
        return feats

    def _group_output(self, ctx: BlockContext, group) -> Callable[[torch.Tensor], torch.Tensor]:
        if group.name == "qkv":
            return lambda h: ctx.block.attention(h, ctx.rope, ctx.mask)
        if group.name == "gate_up":
            return ctx.block.feed_forward
        return ctx.linear(group.linears[0])

    def search_scale(self, ctx: BlockContext, group, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, list[float]]:
        """Best s over the alpha grid; returns (s, the loss of every grid point)."""
        c = self.config
        linears = [ctx.linear(n) for n in group.linears]
        fn = self._group_output(ctx, group)
        x_mean = torch.cat([x.reshape(-1, x.shape[-1]).abs().float() for x in inputs]).mean(0)
        w_mean = weight_mean([l.weight for l in linears], c.group_size) if c.awq_duo_scaling else None
        originals = [l.weight.data.clone() for l in linears]
        with torch.no_grad():
            reference = [fn(x) for x in inputs]
            losses, best, best_scales = [], math.inf, None
            for i in range(c.awq_grid):
                s = candidate_scales(x_mean, w_mean, i / c.awq_grid)
                for l, w in zip(linears, originals):
                    scaled = w.float() * s
                    l.weight.data = (group_fake_quant(scaled, c.wbits, c.group_size, c.sym) / s).to(w.dtype)
                loss = sum(F.mse_loss(fn(x).float(), r.float(), reduction="sum").item()
                           for x, r in zip(inputs, reference)) / sum(r.numel() for r in reference)
                losses.append(loss)
                if loss < best:
                    best, best_scales = loss, s
            for l, w in zip(linears, originals):
                l.weight.data = w
        return best_scales.to(originals[0].device), losses


def fold_scales(ctx: BlockContext, group, s: torch.Tensor) -> None:
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


def _token_sample(inputs: list[torch.Tensor], n_tokens: int) -> torch.Tensor:
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs]).float()
    step = max(1, x.shape[0] // n_tokens)
    return x[::step][:n_tokens]


def clip_weight(linear: nn.Linear, x: torch.Tensor, bits: int, group_size: int, sym: bool, n_grid: int,
                max_shrink: float) -> None:
    """Per (output row, group): the max |w| (shrunk by up to max_shrink) whose quantized partial
    outputs x_g . w_g best match the originals; then clamp the weight to it."""
    w = linear.weight.data.float()
    n_out, n_in = w.shape
    g = n_in if group_size == -1 else group_size
    pad = (-n_in) % g
    xg = F.pad(x, (0, pad)).reshape(x.shape[0], -1, g)                      # [T, G, g]
    wg = F.pad(w, (0, pad)).reshape(n_out, -1, g)                           # [O, G, g]
    best_max = wg.abs().amax(dim=-1, keepdim=True)                          # [O, G, 1]
    org_max = best_max.clone()
    spec = QuantSpec(bits=bits, symmetric=sym, granularity="channel")
    chunk = max(1, (1 << 26) // max(1, x.shape[0] * wg.shape[1] * g))
    for o in range(0, n_out, chunk):
        w_c, max_c = wg[o:o + chunk], org_max[o:o + chunk]
        ref = torch.einsum("tgk,ogk->otg", xg, w_c)
        min_err = torch.full(max_c.shape[:2], math.inf, device=w.device)
        for i in range(int(max_shrink * n_grid)):
            m = max_c * (1 - i / n_grid)
            clipped = torch.maximum(torch.minimum(w_c, m), -m)
            q = fake_quantize(clipped.reshape(-1, g), spec).reshape(clipped.shape)
            err = (torch.einsum("tgk,ogk->otg", xg, q) - ref).pow(2).mean(dim=1)
            better = err < min_err
            min_err[better] = err[better]
            best_max[o:o + chunk][better] = m[better]
    clipped = torch.maximum(torch.minimum(wg, best_max), -best_max).reshape(n_out, -1)[:, :n_in]
    linear.weight.data = clipped.to(linear.weight.dtype)


def _relative_output_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    ref = x @ w.T
    return ((x @ (q - w).T).norm() / ref.norm().clamp_min(1e-12)).item()
