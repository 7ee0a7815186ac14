"""How far a (quantized) masked diffusion model is from a reference model, on the same masked text.

Two paired measures on fixed windows of held-out text, both computed against a `Reference` that holds
everything the reference (full-precision) model said, so the reference model runs once per study
model and every quantized cell only runs itself:

- **masked-prediction KL**: each window is masked at fixed ratios (nested masks: ratio r masks the
  first round(r n) positions of one seeded permutation per window); at every masked position,
  KL(p_ref || p) of the predicted token distributions, averaged per window. Also the top-1
  agreement (argmax equal) per window. Same masks for both models, so the values are paired.
- **ELBO delta**: the Monte Carlo bound on -log p(window) per token (as `diffusion_perplexity`:
  k uniform on 1..n stratified over `elbo_mc` draws, weight n/k), with the same draws for both
  models; the per-window difference is what varies, not the masks.

Per-window values are returned (the units a bootstrap resamples); sums run in float64 with math.fsum
over per-position values, so a value does not depend on the thread count or the batch split.

When the reference's full distributions would not fit `max_reference_bytes` (an 8B model's 126k-token
vocabulary), each position keeps the reference's top tokens and one bucket for the rest: the KL of
those coarsened distributions, a lower bound of the full KL (exact when the rest has no mass).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from dllmq.diffusion.likelihood import random_masks
from dllmq.diffusion.logits import mask_predictor_logits, mask_token_id, model_device, require_diffusion
from dllmq.diffusion.perplexity import split_windows, stratified_counts
from dllmq.errors import DllmqError

DEFAULT_RATIOS = (0.1, 0.25, 0.5, 0.75, 1.0)


@dataclass
class Reference:
    """What the reference model predicted on the masked windows (see the module docstring)."""

    windows: Tensor                      # [N, L] token ids
    first: int                           # positions before this are context only (1 for Dream's shift)
    ratios: tuple[float, ...]
    kl_masks: list[Tensor]               # per ratio: bool [N, L]
    logp: list[Tensor]                   # per ratio: [N, k, V'] float32 log-probs at masked positions
    top_index: list[Tensor | None]       # per ratio: [N, k, V'] token ids kept (None = full vocabulary)
    rest: list[Tensor | None]            # per ratio: [N, k] reference mass outside top_index (None = full)
    argmax: list[Tensor]                 # per ratio: [N, k] reference top-1 token
    elbo_masks: Tensor                   # bool [N, mc, L]
    elbo_counts: Tensor                  # [N, mc] masked tokens per draw
    nll: list[float]                     # per window: the reference's ELBO NLL per token (nats)
    batch_size: int = 16
    meta: dict = field(default_factory=dict)

    @property
    def n_windows(self) -> int:
        return int(self.windows.shape[0])


@dataclass
class Divergence:
    """A model against a Reference: per-window values (lists of floats, one per window)."""

    kl: dict[float, list[float]]         # ratio -> mean KL(p_ref || p) over the window's masked positions
    top1: dict[float, list[float]]       # ratio -> fraction of masked positions with the same argmax
    nll: list[float]                     # the model's ELBO NLL per token per window
    nll_ref: list[float]                 # the reference's

    @property
    def nll_delta(self) -> list[float]:
        return [a - b for a, b in zip(self.nll, self.nll_ref)]


def measure_windows(token_ids: Sequence[int] | Tensor, n_windows: int, seqlen: int) -> Tensor:
    """[n_windows, seqlen] non-overlapping windows spread evenly over the text (not just its start)."""
    every = split_windows(token_ids, seqlen)
    if every.shape[0] < n_windows:
        raise DllmqError(f"The held-out text has {every.shape[0]} windows of {seqlen} tokens, fewer than the "
                         f"{n_windows} asked for; ask for fewer windows or shorter ones.")
    idx = torch.linspace(0, every.shape[0] - 1, n_windows).round().long()
    return every[idx]


def _check(ratios: Sequence[float], n_windows: int, elbo_mc: int, batch_size: int) -> tuple[float, ...]:
    ratios = tuple(float(r) for r in ratios)
    if not ratios or any(not 0.0 < r <= 1.0 for r in ratios) or len(set(ratios)) != len(ratios):
        raise DllmqError(f"Mask ratios must be distinct numbers in (0, 1], got {list(ratios)}.")
    if n_windows < 1 or elbo_mc < 0 or batch_size < 1:
        raise DllmqError(f"windows ({n_windows}) and batch_size ({batch_size}) must be positive and elbo_mc "
                         f"({elbo_mc}) not negative.")
    return ratios


def _logits(model: torch.nn.Module, rows: Tensor, batch_size: int) -> list[Tensor]:
    """Mask-predictor logits of `rows` [R, L] in fixed chunks of `batch_size` rows (float32, CPU)."""
    device = model_device(model)
    return [mask_predictor_logits(model, chunk.to(device)).float().cpu() for chunk in rows.split(batch_size)]


def _masked_logprobs(model, windows: Tensor, mask: Tensor, mask_id: int, batch_size: int) -> Tensor:
    """[N, k, V] log-probs at the masked positions (every row masks the same number k)."""
    k = int(mask[0].sum())
    noisy = windows.masked_fill(mask, mask_id)
    out = []
    for logits, m in zip(_logits(model, noisy, batch_size), mask.split(batch_size)):
        out.append(F.log_softmax(logits[m], dim=-1).view(m.shape[0], k, -1))
    return torch.cat(out)


def _window_nll(model, windows: Tensor, masks: Tensor, counts: Tensor, first: int, mask_id: int,
                batch_size: int) -> list[float]:
    """Per window: the ELBO NLL per token, (1/mc) sum over draws of (n/k) sum of masked CE, / n."""
    n_win, mc, length = masks.shape
    if mc == 0:
        return [float("nan")] * n_win
    n = length - first
    rows = windows.unsqueeze(1).expand(n_win, mc, length).reshape(-1, length)
    flat = masks.reshape(-1, length)
    per_row: list[float] = []
    for logits, m, seq in zip(_logits(model, rows.masked_fill(flat, mask_id), batch_size), flat.split(batch_size),
                              rows.split(batch_size)):
        ce = F.cross_entropy(logits[m], seq[m], reduction="none").double().tolist()
        sizes = m.sum(1).tolist()
        start = 0
        for size in sizes:
            per_row.append(math.fsum(ce[start:start + size]))
            start += size
    out = []
    for w in range(n_win):
        draws = [per_row[w * mc + j] * n / int(counts[w, j]) for j in range(mc)]
        out.append(math.fsum(draws) / mc / n)
    return out


@torch.no_grad()
def build_reference(model: torch.nn.Module, windows: Tensor, *, ratios: Sequence[float] = DEFAULT_RATIOS,
                    elbo_mc: int = 4, seed: int = 0, batch_size: int = 16,
                    max_reference_bytes: int = 1 << 30) -> Reference:
    """Run the reference model once over the masked windows and keep what it predicted."""
    require_diffusion(model, "The divergence measures")
    windows = torch.as_tensor(windows, dtype=torch.long).cpu()
    n_win, length = windows.shape
    ratios = _check(ratios, n_win, elbo_mc, batch_size)
    mask_id = mask_token_id(model)
    first = 1 if model.family.shift_logits else 0
    n = length - first
    if n < 1:
        raise DllmqError(f"Windows of {length} tokens leave nothing to score; use longer windows.")
    generator = torch.Generator().manual_seed(seed)
    order = torch.rand(n_win, n, generator=generator).argsort(dim=1) + first   # one permutation per window
    kl_masks = []
    for r in ratios:
        k = max(1, round(r * n))
        m = torch.zeros(n_win, length, dtype=torch.bool)
        m.scatter_(1, order[:, :k], True)
        kl_masks.append(m)
    counts = torch.stack([stratified_counts(n, elbo_mc, generator) for _ in range(n_win)]) if elbo_mc else \
        torch.zeros(n_win, 0, dtype=torch.long)
    elbo_masks = torch.zeros(n_win, elbo_mc, length, dtype=torch.bool)
    for w in range(n_win):
        if elbo_mc:
            elbo_masks[w, :, first:] = random_masks(counts[w], n, generator)

    vocab = None
    logps, tops, rests, argmaxes = [], [], [], []
    for m in kl_masks:
        logp = _masked_logprobs(model, windows, m, mask_id, batch_size)
        vocab = logp.shape[-1]
        argmaxes.append(logp.argmax(-1))
        positions = sum(int(x.sum()) for x in kl_masks)
        keep = min(vocab, max(16, max_reference_bytes // max(1, positions * 8)))
        if keep >= vocab:
            logps.append(logp)
            tops.append(None)
            rests.append(None)
        else:  # coarsen: the top `keep` tokens of the reference and one bucket for the rest
            top_logp, top_idx = logp.topk(keep, dim=-1)
            logps.append(top_logp.contiguous())
            tops.append(top_idx)
            rests.append((1.0 - top_logp.exp().sum(-1)).clamp(min=0.0))
    nll = _window_nll(model, windows, elbo_masks, counts, first, mask_id, batch_size)
    return Reference(windows=windows, first=first, ratios=ratios, kl_masks=kl_masks, logp=logps, top_index=tops,
                     rest=rests, argmax=argmaxes, elbo_masks=elbo_masks, elbo_counts=counts, nll=nll,
                     batch_size=batch_size,
                     meta={"windows": n_win, "seqlen": length, "ratios": list(ratios), "elbo_mc": elbo_mc,
                           "seed": seed, "vocab": vocab,
                           "coarsened": any(t is not None for t in tops)})


def _kl_rows(ref_logp: Tensor, logq: Tensor, top: Tensor | None, rest: Tensor | None) -> Tensor:
    """[N, k] KL(p_ref || q) per position (float64 values from float32 terms)."""
    p = ref_logp.exp()
    if top is None:
        terms = torch.where(p > 0, p * (ref_logp - logq), torch.zeros_like(p))
        return terms.double().sum(-1)
    q_top = logq.gather(-1, top)
    terms = torch.where(p > 0, p * (ref_logp - q_top), torch.zeros_like(p)).double().sum(-1)
    q_rest = (1.0 - q_top.exp().sum(-1)).clamp(min=0.0).double()
    r = rest.double()
    tail = torch.where(r > 0, r * (r.log() - q_rest.clamp(min=1e-30).log()), torch.zeros_like(r))
    return terms + tail


@torch.no_grad()
def compare(model: torch.nn.Module, ref: Reference) -> Divergence:
    """The model's KL to the reference and top-1 agreement per ratio, and its ELBO NLL, per window.
    The reference model compared with its own Reference gives KL 0 and agreement 1 exactly."""
    require_diffusion(model, "The divergence measures")
    mask_id = mask_token_id(model)
    kl: dict[float, list[float]] = {}
    top1: dict[float, list[float]] = {}
    for r, m, ref_logp, top, rest, ref_arg in zip(ref.ratios, ref.kl_masks, ref.logp, ref.top_index, ref.rest,
                                                   ref.argmax):
        logq = _masked_logprobs(model, ref.windows, m, mask_id, ref.batch_size)
        per_pos = _kl_rows(ref_logp, logq, top, rest).tolist()
        same = (logq.argmax(-1) == ref_arg).tolist()
        kl[r] = [math.fsum(row) / len(row) for row in per_pos]
        top1[r] = [sum(row) / len(row) for row in same]
    nll = _window_nll(model, ref.windows, ref.elbo_masks, ref.elbo_counts, ref.first, mask_id, ref.batch_size)
    return Divergence(kl=kl, top1=top1, nll=nll, nll_ref=list(ref.nll))


__all__ = ["DEFAULT_RATIOS", "Divergence", "Reference", "build_reference", "compare", "measure_windows"]
