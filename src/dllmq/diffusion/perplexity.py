"""Perplexity over a long text: exact for causal models, an upper bound for diffusion models.

A masked diffusion model only gives a bound on -log p(x) (its ELBO): with k of the n scored tokens
of a window masked, k uniform on 1..n, -log p(x) <= E[(n / k) * sum of CE on the masked tokens].
Per token that is the mean CE over the masked tokens, averaged over the draws, so
exp(mean NLL) is an upper bound on the true perplexity (up to Monte Carlo noise).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from dllmq.diffusion.likelihood import random_masks
from dllmq.diffusion.logits import (
    mask_predictor_logits,
    mask_token_id,
    model_device,
    raw_logits,
    require_diffusion,
)
from dllmq.errors import DllmqError


@dataclass(frozen=True)
class PerplexityResult:
    nll: float        # mean negative log-likelihood per scored token (nats)
    ppl: float        # exp(nll)
    n_tokens: int     # tokens scored
    n_windows: int
    is_bound: bool    # True for diffusion models: ppl is an upper bound (Monte Carlo ELBO)


def split_windows(token_ids: Sequence[int] | Tensor, seqlen: int, max_windows: int | None = None) -> Tensor:
    """[n_windows, seqlen] non-overlapping windows; a trailing partial window is dropped."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if seqlen < 2:
        raise DllmqError(f"seqlen must be at least 2, got {seqlen}.")
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise DllmqError(
            f"The text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}; "
            "use a longer text or a smaller seqlen."
        )
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    return ids[: n_windows * seqlen].view(n_windows, seqlen)


def _check_seqlen(model: torch.nn.Module, seqlen: int) -> None:
    limit = getattr(model.config, "max_seq_len", None)
    if limit is not None and seqlen > limit:
        raise DllmqError(f"seqlen {seqlen} is longer than the model's max_seq_len of {limit}; lower seqlen.")


def stratified_counts(n: int, samples: int, generator: torch.Generator) -> Tensor:
    """`samples` mask counts, each uniform on 1..n, spread evenly: t_j = (j + u) / samples, k = ceil(t n)."""
    u = torch.rand((), generator=generator)
    t = (torch.arange(samples) + u) / samples
    return torch.ceil(t * n).long().clamp(1, n)


def _result(total_nll: float, n_tokens: int, n_windows: int, is_bound: bool) -> PerplexityResult:
    nll = total_nll / n_tokens
    return PerplexityResult(
        nll=nll, ppl=math.exp(nll), n_tokens=n_tokens, n_windows=n_windows, is_bound=is_bound
    )


@torch.no_grad()
def causal_perplexity(
    model: torch.nn.Module,
    token_ids: Sequence[int] | Tensor,
    *,
    seqlen: int = 2048,
    batch_size: int = 1,
    max_windows: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Exact perplexity of a causal model: windows scored independently, token 0 of each unscored."""
    if not model.family.causal:
        raise DllmqError(
            f"causal_perplexity needs a causal model; {model.family.name!r} is a diffusion family."
        )
    _check_seqlen(model, seqlen)
    windows = split_windows(token_ids, seqlen, max_windows)
    device = model_device(model)
    total = 0.0
    for chunk in tqdm(windows.split(max(1, batch_size)), desc="perplexity", disable=not progress):
        chunk = chunk.to(device)
        logits = raw_logits(model, chunk)[:, :-1].float()
        total += float(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
    return _result(total, windows.shape[0] * (seqlen - 1), windows.shape[0], is_bound=False)


@torch.no_grad()
def diffusion_perplexity(
    model: torch.nn.Module,
    token_ids: Sequence[int] | Tensor,
    *,
    seqlen: int = 2048,
    mc_num: int = 32,
    batch_size: int = 8,
    max_windows: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> PerplexityResult:
    """Monte Carlo ELBO perplexity bound of a masked diffusion model (see the module docstring).

    Each window is scored with `mc_num` masked copies, `batch_size` per forward pass. A model with
    shifted logits (Dream) cannot predict token 0 of a window, so that token is context only.
    """
    require_diffusion(model, "Diffusion perplexity")
    if mc_num < 1 or batch_size < 1:
        raise DllmqError(f"mc_num ({mc_num}) and batch_size ({batch_size}) must be positive.")
    _check_seqlen(model, seqlen)
    windows = split_windows(token_ids, seqlen, max_windows)
    device = model_device(model)
    mask_id = mask_token_id(model)
    generator = torch.Generator().manual_seed(seed)
    first = 1 if model.family.shift_logits else 0
    n_scored = seqlen - first

    total = 0.0
    bar = tqdm(total=windows.shape[0] * mc_num, desc="perplexity (bound)", disable=not progress)
    for window in windows:
        counts = stratified_counts(n_scored, mc_num, generator)
        masks = random_masks(counts, n_scored, generator)
        masks = torch.cat([torch.zeros(mc_num, first, dtype=torch.bool), masks], dim=1)
        window_nll = 0.0
        for rows, k in zip(masks.split(batch_size), counts.split(batch_size)):
            rows = rows.to(device)
            seq = window.to(device).expand_as(rows)
            logits = mask_predictor_logits(model, seq.masked_fill(rows, mask_id))
            ce = F.cross_entropy(logits[rows].float(), seq[rows], reduction="none")
            # (n / k) * (CE summed over the k masked tokens) estimates the window's total NLL bound
            weights = (n_scored / k.to(device).float()).unsqueeze(1).expand_as(rows)[rows]
            window_nll += float((ce * weights).sum())
            bar.update(rows.shape[0])
        total += window_nll / mc_num
    bar.close()
    return _result(total, windows.shape[0] * n_scored, windows.shape[0], is_bound=True)


def perplexity(
    model: torch.nn.Module,
    token_ids: Sequence[int] | Tensor,
    *,
    seqlen: int = 2048,
    mc_num: int = 32,
    batch_size: int = 8,
    max_windows: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of any family: exact for causal models, the ELBO bound for diffusion models."""
    if model.family.causal:
        return causal_perplexity(
            model, token_ids, seqlen=seqlen, batch_size=batch_size, max_windows=max_windows, progress=progress
        )
    return diffusion_perplexity(
        model, token_ids, seqlen=seqlen, mc_num=mc_num, batch_size=batch_size,
        max_windows=max_windows, seed=seed, progress=progress,
    )
