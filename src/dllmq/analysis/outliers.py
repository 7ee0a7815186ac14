"""Activation outlier profiling: what the input of every block linear looks like, and how that changes
as a diffusion LLM's input is masked.

For each mask ratio r (0 = clean calibration text, 1 = every position is the mask token; positions
chosen at random with a seeded generator, nested across ratios since the same seed ranks them), the
calibration windows run through the blocks (the LM head is skipped) and a forward pre-hook on every
linear of every block reduces its input on the fly. Only running reductions are kept (per-channel
and per-token maxima, counts, central moments), never the activations themselves; the token x channel
|x| matrix is captured afterwards for window 0 of the few worst layers only, for the surface plots.

What is recorded is what the layer's quantizer sees: for a linear with an online input transform
(QuaRot's Hadamard before down, DuQuant's smooth-rotate-permute; `OnlineLinear` or `QuantLinear`),
the pre-hook applies `input_transform` itself (`dllmq.quant.online.seen_input`) and reduces the
transformed input, i.e. the tensor the activation quantizer receives (before it rounds). Offline
transforms (SmoothQuant's scales folded into the norms, QuaRot's residual rotation) are already in
the weights, so the plain input is the quantizer's input there.

Definitions (every "median" is the lower median, as `torch.median`; "window" is one calibration
sequence; m_w is the median |x| over all tokens and channels of a layer's input in window w):
- median |x| of a layer: the median over windows of m_w (exactly the median of all values for one window);
- kurtosis: Pearson's, E[(x - mean)^4] / Var(x)^2 over all values (3 for a Gaussian), from central
  moments merged across batches (Chan/Pebay), so it is exact without storing the values;
- normal outlier channel: a channel c with |x[t, c]| > normal_ratio * m_w on at least normal_min_frac
  of all tokens t (equivalently: its median |x| over tokens exceeds normal_ratio times the layer's
  median) — a channel that is large almost everywhere (Dettmers et al.'s systematic outlier features);
- massive value: |x[t, c]| > max(massive_ratio * m_w, massive_floor) — a single value orders of
  magnitude above the rest (Sun et al., "Massive activations"); the absolute floor keeps a dead
  (near-zero) layer from counting; a token carries a massive outlier when any of its values is one.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dllmq.analysis.outlier_report import (
    JSON_NAME,
    LinearStats,
    OutlierReport,
    OutlierThresholds,
    RatioProfile,
    Surface,
    format_summary,
)
from dllmq.analysis.write import write_outlier_report
from dllmq.data import calibration_set, mask_windows
from dllmq.errors import DllmqError
from dllmq.models.family import Family
from dllmq.quant.online import seen_input

log = logging.getLogger(__name__)

DEFAULT_MASK_RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)

__all__ = ["DEFAULT_MASK_RATIOS", "JSON_NAME", "LinearStats", "OutlierReport", "OutlierThresholds", "RatioProfile",
           "Surface", "batch_stats", "format_summary", "profile_outliers", "write_outlier_report"]


# --- per-batch reductions --------------------------------------------------------------------------

@dataclass
class _BatchStats:
    """The reductions of one input tensor [B, T, C] (B windows), shared by every linear that reads it."""

    max_abs: torch.Tensor        # 0-d
    channel_max: torch.Tensor    # [C]
    token_max: torch.Tensor      # [B, T]
    window_median: torch.Tensor  # [B]
    normal_count: torch.Tensor   # [C] tokens with |x| > normal_ratio * m_w
    massive_channel: torch.Tensor  # [C] massive values per channel
    massive_token: torch.Tensor  # [B, T] bool
    moments: tuple[torch.Tensor, ...]  # n, mean, M2, M3, M4 (float64)


def _central_moments(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    v = x.reshape(-1).double()
    n = torch.tensor(float(v.numel()), dtype=torch.float64, device=v.device)
    mean = v.mean()
    d = v - mean
    d2 = d * d
    return n, mean, d2.sum(), (d2 * d).sum(), (d2 * d2).sum()


def _merge_moments(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Central moment sums of the union of two samples (Pebay 2008), exact up to rounding."""
    na, ma, m2a, m3a, m4a = a
    nb, mb, m2b, m3b, m4b = b
    n = na + nb
    delta = mb - ma
    mean = ma + delta * nb / n
    m2 = m2a + m2b + delta ** 2 * na * nb / n
    m3 = m3a + m3b + delta ** 3 * na * nb * (na - nb) / n ** 2 + 3 * delta * (na * m2b - nb * m2a) / n
    m4 = (m4a + m4b + delta ** 4 * na * nb * (na ** 2 - na * nb + nb ** 2) / n ** 3
          + 6 * delta ** 2 * (na ** 2 * m2b + nb ** 2 * m2a) / n ** 2 + 4 * delta * (na * m3b - nb * m3a) / n)
    return n, mean, m2, m3, m4


def batch_stats(x: torch.Tensor, thresholds: OutlierThresholds) -> _BatchStats:
    """Reduce one linear input x [B, T, C] (B windows of T tokens) to the running statistics."""
    if x.dim() == 2:
        x = x[None]
    a = x.detach().float().abs()
    b = a.shape[0]
    medians = a.reshape(b, -1).median(dim=1).values
    normal = a > (thresholds.normal_ratio * medians)[:, None, None]
    limit = torch.clamp(thresholds.massive_ratio * medians, min=thresholds.massive_floor)
    massive = a > limit[:, None, None]
    return _BatchStats(
        max_abs=a.amax(), channel_max=a.amax(dim=(0, 1)), token_max=a.amax(dim=2), window_median=medians,
        normal_count=normal.sum(dim=(0, 1)), massive_channel=massive.sum(dim=(0, 1)),
        massive_token=massive.any(dim=2), moments=_central_moments(x.detach()))


class _LinearAccumulator:
    """Running reductions for one linear over all windows of one mask ratio (on the model's device)."""

    def __init__(self, n_windows: int, seqlen: int, channels: int, device: torch.device):
        self.max_abs = torch.zeros((), device=device)
        self.channel_max = torch.zeros(channels, device=device)
        self.token_max = torch.zeros(n_windows, seqlen, device=device)
        self.window_median = torch.zeros(n_windows, device=device)
        self.normal_count = torch.zeros(channels, dtype=torch.long, device=device)
        self.massive_channel = torch.zeros(channels, dtype=torch.long, device=device)
        self.massive_token = torch.zeros(n_windows, seqlen, dtype=torch.bool, device=device)
        self.moments: tuple[torch.Tensor, ...] | None = None

    def add(self, s: _BatchStats, rows: slice) -> None:
        self.max_abs = torch.maximum(self.max_abs, s.max_abs)
        self.channel_max = torch.maximum(self.channel_max, s.channel_max)
        self.token_max[rows] = s.token_max
        self.window_median[rows] = s.window_median
        self.normal_count += s.normal_count
        self.massive_channel += s.massive_channel
        self.massive_token[rows] = s.massive_token
        self.moments = s.moments if self.moments is None else _merge_moments(self.moments, s.moments)


# --- profiling -------------------------------------------------------------------------------------

class _Recorder:
    """Forward pre-hooks on every block linear, feeding one accumulator per linear.

    The linears of a group read the same tensor (q/k/v, gate/up); when they also share the transform,
    the reductions of the previous call are reused instead of recomputed."""

    def __init__(self, targets: list[tuple[int, str, nn.Module]], thresholds: OutlierThresholds):
        self.targets = targets
        self.thresholds = thresholds
        self.acc: dict[tuple[int, str], _LinearAccumulator] = {}
        self.rows = slice(0, 0)
        self._last: tuple[torch.Tensor, Any, _BatchStats] | None = None
        self._handles: list[Any] = []

    def start(self, n_windows: int, seqlen: int, device: torch.device) -> None:
        self.acc = {(b, name): _LinearAccumulator(n_windows, seqlen, mod.in_features, device)
                    for b, name, mod in self.targets}

    def __enter__(self) -> _Recorder:
        for b, name, module in self.targets:
            self._handles.append(module.register_forward_pre_hook(self._hook(b, name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None

    def _hook(self, block: int, name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            transform = getattr(module, "input_transform", None)
            if self._last is not None and self._last[0] is x and self._last[1] is transform:
                stats = self._last[2]
            else:
                stats = batch_stats(seen_input(module, x), self.thresholds)
                self._last = (x, transform, stats)
            self.acc[(block, name)].add(stats, self.rows)
        return hook

    def end_batch(self) -> None:
        self._last = None  # do not keep the batch's activations alive


def _targets(model: nn.Module, family: Family) -> list[tuple[int, str, nn.Module]]:
    return [(i, name, block.get_submodule(name)) for i, block in enumerate(model.get_blocks())
            for name in family.block_linears]


def _run_blocks(model: nn.Module, ids: torch.Tensor) -> None:
    """The blocks only: the LM head's output is not needed here (and is the largest matmul)."""
    hidden, rope, mask = model.block_inputs(ids)
    for block in model.get_blocks():
        hidden = block(hidden, rope, mask)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _mask_ratios(ratios: Sequence[float], mask_id: int | None, family: Family, notes: list[str]) -> list[float]:
    ratios = sorted({float(r) for r in ratios})
    if not ratios:
        raise DllmqError("Give at least one mask ratio (e.g. 0).")
    bad = [r for r in ratios if not 0.0 <= r <= 1.0]
    if bad:
        raise DllmqError(f"Mask ratios must lie in [0, 1]; got {bad[0]}.")
    if mask_id is None or family.causal:
        if any(r > 0 for r in ratios):
            notes.append(f"{family.name} models have no mask token (causal), so only clean text (mask ratio 0) "
                         "is profiled.")
        return [0.0]
    return ratios


def _windows(tokenizer, calib: str, nsamples: int, seqlen: int, seed: int,
             input_ids: torch.Tensor | None) -> torch.Tensor:
    if input_ids is not None:
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        ids = ids[None] if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.numel() == 0:
            raise DllmqError("input_ids must be a non-empty [windows, tokens] tensor of token ids.")
        return ids.cpu()
    if tokenizer is None:
        raise DllmqError("Profiling calibration text needs the model's tokenizer, and this model has none; "
                         "pass input_ids instead.")
    return calibration_set(tokenizer, calib, nsamples, seqlen, seed)


def _masked(windows: torch.Tensor, ratio: float, mask_id: int | None, seed: int) -> torch.Tensor:
    if ratio == 0.0:
        return windows
    return mask_windows(windows, ratio, mask_id, seed)


def _finish(acc: _LinearAccumulator, block: int, name: str, kind: str, module: nn.Module) -> LinearStats:
    n, mean, m2, _, m4 = (float(m) for m in acc.moments)
    n_tokens = acc.token_max.numel()
    var = m2 / n
    return LinearStats(
        block=block, name=name, kind=kind, transformed=getattr(module, "input_transform", None) is not None,
        in_features=acc.channel_max.numel(), n_tokens=n_tokens, max_abs=float(acc.max_abs),
        median_abs=float(acc.window_median.median()), mean=mean, std=math.sqrt(var),
        kurtosis=n * m4 / m2 ** 2 if m2 > 0 else float("nan"),
        channel_max=acc.channel_max.cpu(), token_max=acc.token_max.cpu(), window_median=acc.window_median.cpu(),
        normal_fraction=(acc.normal_count.double() / n_tokens).cpu(), massive_channel=acc.massive_channel.cpu(),
        massive_token=acc.massive_token.cpu())


def _pool(a: torch.Tensor, max_tokens: int, max_channels: int) -> torch.Tensor:
    """Max-pool [T, C] down to at most (max_tokens, max_channels): outliers survive pooling."""
    t, c = a.shape
    size = (min(t, max_tokens), min(c, max_channels))
    if size == (t, c):
        return a
    return torch.nn.functional.adaptive_max_pool2d(a[None, None], size)[0, 0]


def _capture_surfaces(model: nn.Module, targets: list[tuple[int, str, nn.Module]], windows: torch.Tensor,
                      profiles: list[RatioProfile], ratios: Sequence[float], mask_id: int | None, seed: int,
                      n_layers: int, max_tokens: int, max_channels: int) -> list[Surface]:
    """|x| of window 0 for the n_layers worst (block, kind) inputs by max |x| over all ratios."""
    worst: dict[tuple[int, str], tuple[float, str]] = {}
    for p in profiles:
        for s in p.linears:
            key = (s.block, s.kind)  # linears of a group share their input: one surface per group
            if key not in worst or s.max_abs > worst[key][0]:
                worst[key] = (s.max_abs, s.name)
    chosen = sorted(worst.items(), key=lambda kv: -kv[1][0])[:max(n_layers, 0)]
    if not chosen:
        return []
    modules = {(b, name): m for b, name, m in targets}
    surfaces: list[Surface] = []
    device = _device(model)
    for ratio in ratios:
        captured: dict[tuple[int, str], torch.Tensor] = {}
        handles = []
        for (block, _), (_, name) in chosen:
            def hook(module, args, key=(block, name)):
                captured[key] = seen_input(module, args[0])[0].detach().float().abs().cpu()
            handles.append(modules[(block, name)].register_forward_pre_hook(hook))
        try:
            _run_blocks(model, _masked(windows[:1], ratio, mask_id, seed).to(device))
        finally:
            for h in handles:
                h.remove()
        for (block, kind), (_, name) in chosen:
            a = captured[(block, name)]
            surfaces.append(Surface(block, name, kind, ratio, _pool(a, max_tokens, max_channels), tuple(a.shape)))
    return surfaces


def profile_outliers(model: nn.Module, tokenizer, family: Family | None = None, *, calib: str = "wiki",
                     nsamples: int = 8, seqlen: int = 256, mask_ratios: Sequence[float] = DEFAULT_MASK_RATIOS,
                     seed: int = 0, input_ids: torch.Tensor | None = None, batch_size: int = 4,
                     thresholds: OutlierThresholds | None = None, surface_layers: int = 3,
                     surface_mask_ratios: Sequence[float] = (0.0, 0.5), surface_max_tokens: int = 128,
                     surface_max_channels: int = 256, model_name: str | None = None,
                     progress: bool = False) -> OutlierReport:
    """Profile the input of every block linear over calibration text at each mask ratio.

    `input_ids` ([windows, tokens] or one 1-D window) replaces the calibration text (`calib`,
    `nsamples`, `seqlen`); masking still applies on top. Models without a mask token (causal Llama)
    are profiled at ratio 0 only, with a note. Surfaces (plots) are captured for window 0 of the
    `surface_layers` worst layers at `surface_mask_ratios` that are among the profiled ratios.
    """
    family = family or model.family
    thresholds = thresholds or OutlierThresholds()
    if batch_size < 1:
        raise DllmqError(f"batch_size must be at least 1, got {batch_size}.")
    notes: list[str] = []
    mask_id = getattr(model.config, "mask_token_id", None)
    ratios = _mask_ratios(mask_ratios, mask_id, family, notes)
    windows = _windows(tokenizer, calib, nsamples, seqlen, seed, input_ids)
    n_windows, length = windows.shape
    kinds = {name: g.name for g in family.groups for name in g.linears}
    targets = _targets(model, family)
    device = _device(model)
    recorder = _Recorder(targets, thresholds)
    profiles: list[RatioProfile] = []
    starts = range(0, n_windows, batch_size)
    bar = tqdm(total=len(ratios) * len(starts), desc="outliers", disable=not progress)
    with torch.no_grad(), recorder:
        for ratio in ratios:
            ids = _masked(windows, ratio, mask_id, seed)
            recorder.start(n_windows, length, device)
            for start in starts:
                recorder.rows = slice(start, min(start + batch_size, n_windows))
                _run_blocks(model, ids[recorder.rows].to(device))
                recorder.end_batch()
                bar.update()
            linears = [_finish(recorder.acc[(b, name)], b, name, kinds[name], m) for b, name, m in targets]
            is_mask = ids == mask_id if mask_id is not None else torch.zeros_like(ids, dtype=torch.bool)
            profiles.append(RatioProfile(ratio, is_mask, linears))
            log.info("mask ratio %.2f: %.2f%% of tokens carry a massive value", ratio,
                     100 * profiles[-1].massive_token_fraction())
    bar.close()
    with torch.no_grad():
        chosen_ratios = [r for r in ratios if any(math.isclose(r, s) for s in surface_mask_ratios)] or ratios[:1]
        surfaces = _capture_surfaces(model, targets, windows, profiles, chosen_ratios, mask_id, seed,
                                     surface_layers, surface_max_tokens, surface_max_channels)
    settings = {"calib": calib if input_ids is None else "input_ids", "nsamples": n_windows, "seqlen": length,
                "seed": seed, "batch_size": batch_size, "mask_token_id": mask_id,
                "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    quant = getattr(model.config, "raw", {}).get("quantization_config")
    if quant:
        settings["quantization"] = quant.get("dllmq", quant)
    return OutlierReport(model=model_name or type(model).__name__, family=family.name, settings=settings,
                         thresholds=thresholds, profiles=profiles, surfaces=surfaces, notes=notes)
