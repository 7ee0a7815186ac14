"""Token sampling shared by the samplers: temperature, top-k / top-p filtering, Gumbel-max."""
from __future__ import annotations

import torch
from torch import Tensor

from dllmq.errors import DllmqError


def check_sampling(temperature: float, top_p: float | None, top_k: int | None) -> None:
    if temperature < 0:
        raise DllmqError(f"temperature must be >= 0 (0 means greedy), got {temperature}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise DllmqError(f"top_p must be in (0, 1], got {top_p}.")
    if top_k is not None and top_k < 1:
        raise DllmqError(f"top_k must be a positive integer, got {top_k}.")


def filter_top_k(logits: Tensor, top_k: int) -> Tensor:
    """Keep the top_k largest logits per row (ties with the k-th kept); the rest get the dtype minimum."""
    top_k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def filter_top_p(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (nucleus)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    # drop a token when the tokens before it already reach top_p; the first is always kept
    drop_sorted = (cumulative - sorted_logits.softmax(-1)) > top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


def sample_from_logits(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """(probs, tokens) for logits [N, V]: probs after temperature and filtering (float32),
    tokens sampled from them, or their argmax at temperature 0 (Dream's `sample_tokens`)."""
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = filter_top_p(logits, top_p)
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    probs = logits.softmax(-1)
    if temperature > 0 and probs.shape[0] > 0:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        tokens = probs.argmax(-1)
    return probs, tokens


def gumbel_argmax(logits: Tensor, temperature: float, generator: torch.Generator | None = None) -> Tensor:
    """LLaDA's sampler: argmax of exp(logits) / (-log u)^temperature, u ~ U(0, 1), in float64.

    Taken in log space (logits - temperature * log(-log u)), which has the same argmax without
    overflowing exp; it is a draw from softmax(logits / temperature). Temperature 0 is argmax.
    """
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.double()
    u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return (logits - temperature * torch.log(-torch.log(u))).argmax(-1)
