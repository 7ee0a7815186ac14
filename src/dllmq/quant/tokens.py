"""Calibration tokens: every input window flattened to rows, and an evenly strided sample of them."""
from __future__ import annotations

import torch


def flatten_tokens(inputs: list[torch.Tensor]) -> torch.Tensor:
    """[total tokens, channels] from a list of [..., channels] tensors."""
    return torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs])


def sample_tokens(inputs: list[torch.Tensor], n: int) -> torch.Tensor:
    """At most `n` token rows, taken at an even stride over all of them (deterministic)."""
    x = flatten_tokens(inputs)
    return x[:: max(1, x.shape[0] // n)][:n]
