"""AWQ (Lin et al., 2024), as the reference implementation runs it.

For each group of linears that share an input (q/k/v after the attention norm, attention out after
v, gate/up after the FFN norm, down after up): s = mean|x|^alpha per input channel (optionally
divided by mean normalised |w|^(1-alpha), "duo scaling"), normalised by sqrt(max s * min s), alpha
searched over a grid of 20 in [0, 1) (by default by Fibonacci search, in bfloat16 where that is fast:
AWQSettings) to minimise the MSE of the group's block output (the attention
output for q/k/v, the MLP output for gate/up, the layer's own output otherwise) with the weights
fake-quantized. The best s is folded into the preceding norm or linear (1/s) and the group's weights
(s), which leaves the full-precision model unchanged. Then a clipping search (20 points, shrink down
to 0.5, not for q/k) and round-to-nearest. v -> out is skipped when shapes differ (GQA). The next
block is fed full-precision outputs, as in the reference.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dllmq.models.family import SCORE_ATTENTION, SCORE_LINEAR, LinearGroup
from dllmq.quant.block import BlockContext, QuantizedWeight
from dllmq.quant.formats import fake_quantize as fp_fake_quantize
from dllmq.quant.formats import weight_tensor_scale
from dllmq.quant.gptq_solver import HESSIAN_CHUNK, HessianAccumulator
from dllmq.quant.methods.base import WEIGHT_ONLY, Method
from dllmq.quant.rounding import rtn_values, rtn_weight
from dllmq.quant.smoothing import can_fold, fold_scales
from dllmq.quant.specs import MethodSettings, WeightSpec, setting
from dllmq.quant.tokens import channel_abs_mean, sample_tokens

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AWQSettings(MethodSettings):
    awq_grid: int = setting(20, "points of the scale (alpha) and clip searches")
    awq_duo_scaling: bool = setting(False, "duo scaling: divide by mean|w|^(1-alpha) too", flag="--duo-scaling")
    awq_clip: bool = setting(True, "skip the clipping search", flag="--no-clip", invert=True)
    awq_max_shrink: float = setting(0.5, "the clip search shrinks max |w| down to this fraction")
    awq_clip_tokens: int = setting(512, "calibration tokens the clip search looks at")
    awq_search_tokens: int = setting(4096, "calibration tokens a scale search scores on when the scored output "
                                           "is not the group's own linear (whole windows for attention); 0 = all")

    awq_linear_tokens: int = setting(4096, "calibration tokens the scale search of a group scored on its own "
                                           "output (attention out, down) scores on, at an even stride; 0 = every "
                                           "token, exactly, through their Gram matrix")

    awq_refine: bool = setting(True, "search the alpha grid point by point instead of by Fibonacci search (7 of "
                                     "20 evaluations, the same choice whenever the loss is unimodal along the "
                                     "grid)",
                               flag="--awq-full-grid", invert=True)

    awq_score_block: bool = setting(False, "score the scales of the groups that read a norm (q/k/v, gate/up) on the "
                                           "whole block's output with the group's input fed as the block's input "
                                           "(the study's LLaDA AWQ)")

    awq_search_dtype: str = setting("auto", "precision of the scale search's forward passes (they only rank the "
                                             "candidates): model (the model's dtype), bfloat16, or auto (bfloat16 "
                                             "for a float32 model on a CPU with AMX at 4 bits or fewer, where it is "
                                             "about 5x faster; the model's dtype elsewhere)",
                                    flag="--awq-search-dtype", choices=("auto", "model", "bfloat16"))

    # earlier versions scored every search on all tokens, on the family's scored outputs, at every grid point,
    # in the model's dtype
    STORED_BEFORE = {"awq_search_tokens": 0, "awq_score_block": False, "awq_refine": False,
                     "awq_search_dtype": "model", "awq_linear_tokens": 0}


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
    display_name = "AWQ"
    kind = WEIGHT_ONLY
    Settings = AWQSettings
    propagate_quantized = False

    @classmethod
    def takes_token_weights(cls, settings) -> bool:
        return True

    @classmethod
    def paper_settings(cls, family: str | None) -> dict:
        # The study's llm-awq fork (entry.py, quantize/auto_scale.py, auto_clip.py, utils/calib_data.py):
        # asymmetric (zero_point), scales x_max^alpha without duo scaling, 20-point grids, every search on
        # every calibration token, clip on 512 tokens down to 0.5; Pile validation shuffled with seed 42,
        # 128 documents of at most 512 tokens concatenated and cut into 512-token windows.
        settings = dict(sym=False, awq_grid=20, awq_duo_scaling=False, awq_clip=True, awq_max_shrink=0.5,
                        awq_clip_tokens=512, awq_search_tokens=0, awq_linear_tokens=0, awq_refine=False,
                        awq_search_dtype="model",
                        calib_windows="documents", nsamples=128, seqlen=512)
        if family == "llada":
            settings["awq_score_block"] = True   # auto_scale.py's LLaDALlamaBlock: module2inspect=module
        return settings

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        st = self.settings
        spec = replace(self.config.weight, clip=1.0)  # the clip search replaces a fixed clip ratio
        feats = ctx.group_inputs()
        if ctx.index == 0:
            precision = search_precision(st.awq_search_dtype, ctx.linear(ctx.family.block_linears[0]).weight, spec)
            log.info("AWQ scale search in %s (awq_search_dtype %s)", precision or "the model's dtype",
                     st.awq_search_dtype)
        # search every group on the original block, then fold all scales (as the reference does)
        chosen = [(g, self.search_scale(ctx, g, feats[g.role])[0]) for g in ctx.family.groups
                  if can_fold(ctx, g) and ctx.quantized(g.linears)]
        # the clip search and the error report look at a sample of each group's inputs (scaled like
        # the group's weights once its scales are folded: the rows are sampled first, then divided)
        samples = {g.role: sample_tokens(feats[g.role], st.awq_clip_tokens) for g in ctx.family.groups}
        del feats
        for group, scales in chosen:
            fold_scales(ctx, group, scales)
            samples[group.role] = samples[group.role] / scales.to(samples[group.role].dtype)
        results = {}
        # token weights (--weighting) sampled at the same stride as the tokens
        clip_w = None if ctx.weights is None else sample_tokens([w[..., None] for w in ctx.weights],
                                                                st.awq_clip_tokens)[:, 0]
        for group in ctx.family.groups:
            x = samples[group.role].float()
            for name in ctx.quantized(group.linears):   # kept linears keep their (scaled) full-precision weights
                linear = ctx.linear(name)
                if st.awq_clip and group.clip_search(name):
                    clip_weight(linear, x, spec, st.awq_grid, st.awq_max_shrink, clip_w)
                q = rtn_weight(linear.weight, spec)
                q.error = _relative_output_error(linear.weight.float(), q.weight, x)
                q.error_kind = "output"
                results[name] = q
        return results

    def search_scale(self, ctx: BlockContext, group: LinearGroup,
                     inputs: list[torch.Tensor]) -> tuple[torch.Tensor, list[float]]:
        """Best s over the alpha grid; returns (s, the loss of every grid point, NaN where the Fibonacci
        search did not evaluate it).

        A group scored on its own linear's output is scored on `awq_linear_tokens` of the calibration
        tokens, or (0, or more than there are) on every token through their Gram matrix (||(W - Q) x||^2
        summed over tokens is a quadratic form in W - Q); a group scored through attention or the MLP on
        `awq_search_tokens` of them. Forward passes run in the search precision (awq_search_dtype). With token weights
        (ctx.weights, --weighting) every loss is the weighted sum over tokens; the scale statistic
        mean|x| is not weighted."""
        st, spec = self.settings, replace(self.config.weight, clip=1.0)
        linears = [ctx.linear(n) for n in group.linears]
        x_mean = channel_abs_mean(inputs)
        w_mean = weight_mean([l.weight for l in linears], spec.group_size) if st.awq_duo_scaling else None
        originals = [l.weight.data.clone() for l in linears]
        candidates = [candidate_scales(x_mean, w_mean, i / st.awq_grid) for i in range(st.awq_grid)]
        precision = search_precision(st.awq_search_dtype, originals[0], spec)
        with torch.no_grad():
            own_linear = group.scored_on == SCORE_LINEAR and len(linears) == 1
            if own_linear and not 0 < st.awq_linear_tokens < sum(x.shape[:-1].numel() for x in inputs):
                loss_of = _linear_loss(originals[0].float(), inputs, spec, ctx.weights)
                best, losses = grid_argmin(len(candidates), lambda i: loss_of(candidates[i]), st.awq_refine)
            else:
                whole_block = st.awq_score_block and group.reads_norm
                if whole_block:   # the group's input (a norm's output) run through the whole block
                    fn = lambda h: ctx.block(h, ctx.rope, ctx.mask)    # noqa: E731
                else:
                    fn = ctx.scored_output(group)
                search, search_w = _search_inputs(inputs, st.awq_linear_tokens if own_linear else st.awq_search_tokens,
                                                  whole_block or group.scored_on == SCORE_ATTENTION, ctx.weights)
                if precision is not None:
                    fn = _in_precision(fn, precision)
                reference = [fn(x).float() for x in search]
                count = sum(r.numel() for r in reference)
                quantized = set(ctx.quantized(group.linears))   # a linear kept in full precision stays exact

                def loss(i: int) -> float:
                    s = candidates[i]
                    for name, l, w in zip(group.linears, linears, originals):
                        if name in quantized:
                            l.weight.data = (rtn_values(w.float() * s, spec) / s).to(w.dtype)
                    if search_w is None:
                        return sum(F.mse_loss(fn(x).float(), r, reduction="sum").item()
                                   for x, r in zip(search, reference)) / count
                    return sum(((fn(x).float() - r).pow(2).sum(-1) * w.to(r.device)).sum().item()
                               for x, r, w in zip(search, reference, search_w)) / count

                try:
                    best, losses = grid_argmin(len(candidates), loss, st.awq_refine)
                finally:
                    for l, w in zip(linears, originals):
                        l.weight.data = w
        return candidates[best].to(originals[0].device), losses


def search_precision(choice: str, weight: torch.Tensor, spec: WeightSpec) -> torch.dtype | None:
    """The dtype the scale search runs its forward passes in (None: the model's own), per awq_search_dtype.
    bfloat16 keeps 8 significant bits, enough to rank the grids of 4-bit weights or coarser, and a CPU
    with AMX multiplies it about 5x faster than float32."""
    if choice == "bfloat16":
        return torch.bfloat16
    if choice == "auto" and weight.dtype == torch.float32 and weight.device.type == "cpu" and spec.bits <= 4:
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        if amx is not None and amx():
            return torch.bfloat16
    return None


def _in_precision(fn: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=dtype):
            return fn(x)
    return run


def grid_argmin(n: int, loss: Callable[[int], float], refine: bool) -> tuple[int, list[float]]:
    """The grid point in range(n) with the smallest loss (the first of equal ones) and the losses (NaN
    where not evaluated). Without `refine` every point is evaluated. With it, a Fibonacci search: two
    interior points of a bracket of Fibonacci length, the bracket shrunk to the side of the smaller loss
    (the left one on a tie), which keeps one of them, until one point is left; then point 0 too, and
    the best point evaluated wins. On a unimodal loss the result is the full grid's, from about
    log_1.618(n) + 1 evaluations (7 of 20)."""
    losses = [math.nan] * n

    def at(i: int) -> float:
        if i >= n:
            return math.inf          # the bracket is padded past the grid's end
        if math.isnan(losses[i]):
            losses[i] = loss(i)
        return losses[i]

    if not refine:
        for i in range(n):
            at(i)
        return min(range(n), key=losses.__getitem__), losses
    fib = [1, 2]
    while fib[-1] < n + 1:
        fib.append(fib[-1] + fib[-2])
    k = len(fib) - 1
    low = -1                          # the bracket is (low, low + fib[k]), both ends excluded
    while k >= 2:
        left, right = low + fib[k - 2], low + fib[k - 1]
        if at(left) > at(right):
            low = left
        k -= 1
    at(low + 1)
    at(0)    # alpha 0 (s = 1: plain rounding) always competes, so the search never loses to it
    return min((i for i in range(n) if not math.isnan(losses[i])), key=losses.__getitem__), losses


def _search_inputs(inputs: list[torch.Tensor], n_tokens: int, whole_windows: bool,
                   weights: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """What a scale search scores on: every input (n_tokens 0 or more than there are), whole windows
    at an even stride (attention needs whole sequences), or tokens at an even stride; with the
    token weights of what it picked (None without weights)."""
    total = sum(x.shape[:-1].numel() for x in inputs)
    if n_tokens <= 0 or n_tokens >= total:
        return inputs, weights
    if not whole_windows:
        picked_w = None if weights is None else [sample_tokens([w[..., None] for w in weights], n_tokens)[:, 0]]
        return [sample_tokens(inputs, n_tokens)], picked_w
    windows = [w for x in inputs for w in x.reshape(-1, x.shape[-2], x.shape[-1])]
    keep = max(1, n_tokens // windows[0].shape[0])
    stride = max(1, len(windows) // keep)
    picked = windows[::stride][:keep]
    picked_w = None if weights is None else [torch.cat(weights)[::stride][:keep]]
    return [torch.stack(picked)], picked_w


def _linear_loss(w: torch.Tensor, inputs: list[torch.Tensor], spec: WeightSpec,
                 weights: list[torch.Tensor] | None = None) -> Callable[[torch.Tensor], float]:
    """The mean squared output error of the linear for a candidate s, over every token, from the inputs'
    Gram matrix G = sum x x^T: sum_t ||D x_t||^2 = sum(D G * D) with D = W - Q(W s) / s (with token
    weights, G = sum w x x^T). Exact float32 whatever the search precision: in bfloat16 the Gram matrix's
    fixed 512-token products gain little (0.36 against 0.41 s for SmolLM2's down projection, 2 threads)
    and larger ones change with the thread count."""
    gram = HessianAccumulator(w.shape[1], w.device)     # float32, in fixed chunks (thread-count independent)
    for i, x in enumerate(inputs):
        gram.add(x.to(w.device), None if weights is None else weights[i])
    G = gram.S
    count = gram.n * w.shape[0]

    def loss(s: torch.Tensor) -> float:
        D = w - rtn_values(w * s, spec) / s
        return float(((D @ G) * D).double().sum()) / count
    return loss


def clip_weight(linear: nn.Linear, x: torch.Tensor, spec: WeightSpec, n_grid: int, max_shrink: float,
                token_weights: torch.Tensor | None = None) -> None:
    """Per (output row, group): the max |w| (shrunk by up to max_shrink) whose quantized partial
    outputs x_g . w_g best match the originals (the mean over tokens, weighted by `token_weights`
    [T] when given); then clamp the weight to it.

    The mean squared error of a partial output over the tokens is a quadratic form in d = q_g - w_g:
    d^T C_g d with C_g = mean_t x_g x_g^T, so each group's g x g second moment is computed once and
    a candidate costs g multiply-adds per weight instead of one per weight and token."""
    w = linear.weight.data.float()
    n_out, n_in = w.shape
    g = n_in if spec.group_size == -1 else spec.group_size
    pad = (-n_in) % g
    wg = F.pad(w, (0, pad)).reshape(n_out, -1, g)                           # [O, G, g]
    moments = group_moments(x, g, token_weights)                            # [G, g, g]
    best_max = wg.abs().amax(dim=-1, keepdim=True)                          # [O, G, 1]
    org_max = best_max.clone()
    # each (row, group) rounded as the final rounding will round it: one row of a per-row grid
    row_spec = replace(spec, group_size=-1)
    if spec.fmt.is_float:   # one (row, group) is one of the format's blocks (FP8: the whole row)
        rows_fmt, tensor_scale = replace(spec.fmt, block=0), weight_tensor_scale(w, spec.fmt)
    min_err = torch.full(org_max.shape[:2], math.inf, device=w.device)
    for i in range(int(max_shrink * n_grid)):
        m = org_max * (1 - i / n_grid)
        clipped = torch.maximum(torch.minimum(wg, m), -m)
        if spec.fmt.is_float:
            q = fp_fake_quantize(clipped.reshape(-1, g), rows_fmt, tensor_scale).reshape(clipped.shape)
        else:
            q = rtn_values(clipped.reshape(-1, g), row_spec).reshape(clipped.shape)
        d = (q - wg).transpose(0, 1)                                        # [G, O, g]
        err = (torch.bmm(d, moments) * d).sum(-1).T                         # [O, G]
        better = err < min_err
        min_err = torch.where(better, err, min_err)
        best_max = torch.where(better[..., None], m, best_max)
    clipped = torch.maximum(torch.minimum(wg, best_max), -best_max).reshape(n_out, -1)[:, :n_in]
    linear.weight.data = clipped.to(linear.weight.dtype)


def group_moments(x: torch.Tensor, g: int, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """[G, g, g]: for each group of g input channels (zero-padded at the end), the mean over the T
    tokens of x_g x_g^T (of w_t x_g x_g^T with token weights [T]; still divided by T). Summed in fixed
    runs of tokens, so the result does not depend on the thread count."""
    T = x.shape[0]
    xg = F.pad(x.float(), (0, (-x.shape[1]) % g)).reshape(T, -1, g).transpose(0, 1)   # [G, T, g]
    left = xg if token_weights is None else xg * token_weights.to(xg)[None, :, None]
    total = torch.zeros(xg.shape[0], g, g, device=x.device)
    for start in range(0, T, HESSIAN_CHUNK):
        stop = start + HESSIAN_CHUNK
        total += torch.bmm(left[:, start:stop].transpose(1, 2), xg[:, start:stop])
    return total / max(T, 1)


def _relative_output_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    ref = x @ w.T
    return ((x @ (q - w).T).norm() / ref.norm().clamp_min(1e-12)).item()
