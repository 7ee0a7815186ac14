"""How far a (quantized) causal model is from a reference model: the causal counterpart of `divergence`.

A causal model has no mask token, so "the predicted distribution at a masked position" becomes "the
next-token distribution given the true prefix": on the same windows of held-out text the study
masks for the diffusion models, every position t >= 1 is predicted from tokens 0..t-1 (teacher
forcing), by the reference and by the model.

- **next-token KL**: KL(p_ref || p) of the next-token distributions, averaged per window; and the
  top-1 agreement (argmax equal) per window;
- **exact NLL**: the model's -log p(window) per predicted token (exact for a causal model, where a
  diffusion model only has the ELBO bound), and the reference's.

Per-window values (the bootstrap's units); sums in float64 with math.fsum, so values do not depend on
thread count or batch split. The reference is coarsened to its top tokens + one bucket beyond
`max_reference_bytes`, exactly as `divergence.build_reference` does (then the KL is a lower bound).
Teacher-forced generation flips (the counterpart of the denoising trajectory) are `record_continuation`
and `continuation_flips`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from dllmq.diffusion.causal_sampler import causal_generate
from dllmq.diffusion.divergence import _kl_rows
from dllmq.diffusion.logits import model_device, positions_from_mask, raw_logits
from dllmq.errors import DllmqError


def require_causal(model: torch.nn.Module, what: str) -> None:
    if not model.family.causal:
        raise DllmqError(f"{what} need a causal model; {model.family.name!r} is a diffusion family "
                         "(use dllmq.diffusion.divergence).")


@dataclass
class NextTokenReference:
    windows: Tensor                      # [N, L] token ids
    logp: Tensor                         # [N, L-1, V'] float32 reference log-probs of tokens 1..L-1
    top_index: Tensor | None             # [N, L-1, V'] kept token ids (None = full vocabulary)
    rest: Tensor | None                  # [N, L-1] reference mass outside top_index
    argmax: Tensor                       # [N, L-1]
    nll: list[float]                     # per window: the reference's NLL per predicted token (nats)
    batch_size: int = 16
    meta: dict = field(default_factory=dict)


@dataclass
class NextTokenDivergence:
    kl: list[float]                      # per window: mean KL(p_ref || p) over predicted positions
    top1: list[float]                    # per window: fraction of positions with the reference's argmax
    nll: list[float]                     # per window: the model's NLL per predicted token
    nll_ref: list[float]


def _next_logprobs(model, windows: Tensor, batch_size: int) -> Tensor:
    """[N, L-1, V] float32 log p(token t | tokens < t) for t = 1..L-1 (CPU)."""
    device = model_device(model)
    out = [F.log_softmax(raw_logits(model, chunk.to(device))[:, :-1].float().cpu(), dim=-1)
           for chunk in windows.split(batch_size)]
    return torch.cat(out)


def _nll(logp: Tensor, windows: Tensor) -> list[float]:
    per_pos = (-logp.gather(-1, windows[:, 1:, None])[..., 0]).double().tolist()
    return [math.fsum(row) / len(row) for row in per_pos]


@torch.no_grad()
def build_next_token_reference(model: torch.nn.Module, windows: Tensor, *, batch_size: int = 16,
                               max_reference_bytes: int = 1 << 30) -> NextTokenReference:
    """Run the reference (causal) model once over the windows and keep its next-token distributions."""
    require_causal(model, "The next-token measures")
    windows = torch.as_tensor(windows, dtype=torch.long).cpu()
    if windows.dim() != 2 or windows.shape[1] < 2 or batch_size < 1:
        raise DllmqError("The next-token measures need [windows, tokens] ids with at least 2 tokens per window "
                         "and a positive batch size.")
    logp = _next_logprobs(model, windows, batch_size)
    vocab = logp.shape[-1]
    keep = min(vocab, max(16, max_reference_bytes // max(1, logp.shape[0] * logp.shape[1] * 8)))
    top = rest = None
    stored = logp
    if keep < vocab:
        stored, top = logp.topk(keep, dim=-1)
        stored = stored.contiguous()
        rest = (1.0 - stored.exp().sum(-1)).clamp(min=0.0)
    return NextTokenReference(windows, stored, top, rest, logp.argmax(-1), _nll(logp, windows), batch_size,
                              meta={"windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
                                    "vocab": vocab, "coarsened": top is not None})


@torch.no_grad()
def compare_next_token(model: torch.nn.Module, ref: NextTokenReference) -> NextTokenDivergence:
    """The model against the reference, per window. The reference model against itself: KL 0, top-1 1."""
    require_causal(model, "The next-token measures")
    logq = _next_logprobs(model, ref.windows, ref.batch_size)
    per_pos = _kl_rows(ref.logp, logq, ref.top_index, ref.rest).tolist()
    same = (logq.argmax(-1) == ref.argmax).tolist()
    return NextTokenDivergence(kl=[math.fsum(r) / len(r) for r in per_pos], top1=[sum(r) / len(r) for r in same],
                               nll=_nll(logq, ref.windows), nll_ref=list(ref.nll))


# ----------------------------------------------------------------------------- teacher-forced continuations
@dataclass
class Continuation:
    """The reference's greedy continuation of prompts and its choice at each generated position."""

    ids: Tensor                 # [B, P + G]: prompt then the reference's generated tokens
    attention_mask: Tensor | None  # [B, P + G] (left padding of the prompts) or None
    prompt_len: int
    steps: list[int]            # per row: generated tokens up to and including the first stop token
    choice: Tensor              # [B, G]: the reference's argmax at each generated position (teacher-forced)

    @property
    def max_steps(self) -> int:
        return int(self.choice.shape[1])


def _choices(model, ids: Tensor, attention_mask: Tensor | None, prompt_len: int) -> Tensor:
    """[B, G] argmax of the next-token logits at every generated position, given the sequence's prefix."""
    device = model_device(model)
    mask, positions = positions_from_mask(attention_mask)
    logits = raw_logits(model, ids.to(device), None if mask is None else mask.to(device),
                        None if positions is None else positions.to(device))
    return logits[:, prompt_len - 1:-1].argmax(-1).cpu()


@torch.no_grad()
def record_continuation(model: torch.nn.Module, prompt_ids: Tensor, attention_mask: Tensor | None = None, *,
                        gen_length: int, stop_ids=None) -> Continuation:
    """Greedy continuation of `gen_length` tokens by the reference (causal) model."""
    require_causal(model, "Teacher-forced continuations")
    ids = causal_generate(model, prompt_ids, attention_mask=attention_mask, max_new_tokens=gen_length,
                          stop_ids=stop_ids).cpu()
    prompt_len = int(prompt_ids.shape[1])
    full = None
    if attention_mask is not None and not bool(attention_mask.all()):
        full = torch.cat([attention_mask.bool().cpu(), torch.ones(ids.shape[0], ids.shape[1] - prompt_len,
                                                                  dtype=torch.bool)], dim=1)
    eos = getattr(model.config, "eos_token_id", None)
    stops = set(stop_ids) if stop_ids is not None else ({eos} if eos is not None else set())
    steps = []
    for row in ids[:, prompt_len:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        steps.append(end)
    return Continuation(ids, full, prompt_len, steps, _choices(model, ids, full, prompt_len))


@torch.no_grad()
def continuation_flips(model: torch.nn.Module, cont: Continuation) -> list[list[int]]:
    """[row][step] 1 where the model, given the reference's prefix, predicts another next token than the
    reference did; rows stop where the reference's continuation stopped."""
    mine = _choices(model, cont.ids, cont.attention_mask, cont.prompt_len)
    differ = (mine != cont.choice).long().tolist()
    return [row[:n] for row, n in zip(differ, cont.steps)]


__all__ = ["Continuation", "NextTokenDivergence", "NextTokenReference", "build_next_token_reference",
           "compare_next_token", "continuation_flips", "record_continuation"]
