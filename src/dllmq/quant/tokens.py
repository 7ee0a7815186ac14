"""Calibration tokens: every input window flattened to rows, and an evenly strided sample of them."""
from __future__ import annotations

import torch


def flatten_tokens(inputs: list[torch.Tensor]) -> torch.Tensor:
    """[total tokens, channels] from a list of [..., channels] tensors."""
    return torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs])


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
