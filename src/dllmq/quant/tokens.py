"""Calibration tokens: per-channel statistics over every window, and an evenly strided sample of them."""
from __future__ import annotations

import torch


def channel_abs_mean(inputs: list[torch.Tensor]) -> torch.Tensor:
    """mean |x| per channel over every token of a list of [..., L, channels] tensors, in float32, without
    concatenating them: each window's column sums are added in order in float64, so neither how the
    windows are batched nor the thread count changes the result."""
    total, count = None, 0
    for t in inputs:
        for window in t.reshape(-1, t.shape[-2], t.shape[-1]) if t.dim() >= 2 else t.reshape(1, 1, -1):
            s = window.float().abs().sum(0, dtype=torch.float64)
            total = s if total is None else total.add_(s)
            count += window.shape[0]
    return (total / max(count, 1)).float()


def sample_tokens(inputs: list[torch.Tensor], n: int) -> torch.Tensor:
    """At most `n` token rows, taken at an even stride over all of them (deterministic). The rows are
    picked from each input in place, without first concatenating every token."""
    rows = [t.reshape(-1, t.shape[-1]) for t in inputs]
    total = sum(r.shape[0] for r in rows)
    picked = torch.arange(0, total, max(1, total // max(n, 1)))[:n]
    parts, start = [], 0
    for r in rows:
        local = picked[(picked >= start) & (picked < start + r.shape[0])] - start
        if local.numel():
            parts.append(r[local.to(r.device)])
        start += r.shape[0]
    return torch.cat(parts) if parts else rows[0][:0]
