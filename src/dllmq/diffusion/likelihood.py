"""log p(answer | prompt) for multiple-choice scoring.

A masked diffusion model has no exact likelihood; LLaDA's evaluation scores an answer with a Monte
Carlo estimate of its ELBO: mask k of the L answer tokens, score the masked ones, weight by L/k,
and average over draws of k (stratified over a batch so each batch covers 1..L evenly). A causal
model gets its exact log-likelihood so one call site scores every family.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from dllmq.diffusion.logits import (
    mask_predictor_logits,
    mask_token_id,
    model_device,
    raw_logits,
    require_diffusion,
)
from dllmq.errors import DllmqError

TokenIds = Sequence[int] | Tensor


def as_ids(ids: TokenIds, name: str) -> Tensor:
    """A 1-D LongTensor on the CPU from a list, a 1-D tensor or a [1, L] tensor."""
    t = torch.as_tensor(ids, dtype=torch.long).cpu()
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise DllmqError(f"{name} must be one sequence of token ids, got a tensor of shape {tuple(t.shape)}.")
    return t


def _check_pair(model: torch.nn.Module, prompt: Tensor, answer: Tensor) -> None:
    if answer.numel() == 0:
        raise DllmqError("The answer is empty; give at least one answer token to score.")
    if prompt.numel() == 0 and (model.family.shift_logits or model.family.causal):
        raise DllmqError(
            f"The prompt is empty, but a {model.family.name!r} model reads token i at position i-1; "
            "start the prompt with at least one token (for example the BOS token)."
        )
    limit = getattr(model.config, "max_seq_len", None)
    total = prompt.numel() + answer.numel()
    if limit is not None and total > limit:
        raise DllmqError(
            f"Prompt plus answer is {total} tokens, more than the model's max_seq_len of {limit}; "
            "shorten the prompt (for example use fewer few-shot examples)."
        )


def _batch_size(mc_num: int, batch_size: int) -> int:
    if mc_num < 1 or batch_size < 1:
        raise DllmqError(f"mc_num ({mc_num}) and batch_size ({batch_size}) must be positive.")
    batch_size = min(batch_size, mc_num)
    if mc_num % batch_size:
        raise DllmqError(
            f"mc_num ({mc_num}) must be a multiple of batch_size ({batch_size}); "
            "pick a batch size that divides it."
        )
    return batch_size


def stratified_mask_counts(length: int, batch: int, generator: torch.Generator) -> Tensor:
    """How many of `length` tokens each of `batch` rows masks: one uniform start in 1..length,
    then evenly spaced around the circle, so every batch covers the whole range of counts."""
    k0 = int(torch.randint(1, length + 1, (), generator=generator))
    counts = torch.round(torch.linspace(k0, k0 + (batch - 1) * length / batch, batch)).long()
    return (counts - 1) % length + 1


def random_masks(counts: Tensor, length: int, generator: torch.Generator) -> Tensor:
    """Bool [len(counts), length]: row r masks exactly counts[r] positions, chosen uniformly."""
    ranks = torch.rand(len(counts), length, generator=generator).argsort(dim=1).argsort(dim=1)
    return ranks < counts.unsqueeze(1)


@dataclass
class _McPair:
    """One pair's Monte Carlo batches, drawn up front: the sequence, and per batch the mask counts and the
    masked positions. `noisy(i)` is batch i's model input."""

    seq: Tensor            # [batch_size, L] on the model's device
    n_prompt: int
    n_answer: int
    draws: list[tuple[Tensor, Tensor]]  # (counts [batch_size], masked [batch_size, L] bool)

    def noisy(self, i: int, mask_id: int) -> Tensor:
        return self.seq.masked_fill(self.draws[i][1], mask_id)

    def prompt_mask(self) -> Tensor:
        return torch.arange(self.seq.shape[1], device=self.seq.device) < self.n_prompt

    def batch_loss(self, i: int, logits: Tensor) -> float:
        """Batch i's estimate from its logits [batch_size, L, V]."""
        counts, masked = self.draws[i]
        ce = F.cross_entropy(logits[masked].float(), self.seq[masked], reduction="none")
        # weight L/k: each row is an unbiased estimate of the answer's ELBO
        weights = (self.n_answer / counts.to(masked.device).float()).unsqueeze(1).expand_as(masked)[masked]
        return float((ce * weights).sum()) / self.seq.shape[0]


def _mc_pair(model: torch.nn.Module, prompt_ids: TokenIds, answer_ids: TokenIds, mc_num: int, batch_size: int,
             seed: int) -> _McPair:
    require_diffusion(model, "Monte Carlo likelihood")
    prompt, answer = as_ids(prompt_ids, "prompt_ids"), as_ids(answer_ids, "answer_ids")
    _check_pair(model, prompt, answer)
    batch_size = _batch_size(mc_num, batch_size)
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)  # CPU: same draws on every device
    n_prompt, n_answer = prompt.numel(), answer.numel()
    seq = torch.cat([prompt, answer]).to(device).repeat(batch_size, 1)
    draws = []
    for _ in range(mc_num // batch_size):
        counts = stratified_mask_counts(n_answer, batch_size, generator)
        answer_mask = random_masks(counts, n_answer, generator).to(device)
        prompt_part = torch.zeros(batch_size, n_prompt, dtype=torch.bool, device=device)
        draws.append((counts, torch.cat([prompt_part, answer_mask], dim=1)))
    return _McPair(seq, n_prompt, n_answer, draws)


@torch.no_grad()
def mc_loglikelihood(
    model: torch.nn.Module,
    prompt_ids: TokenIds,
    answer_ids: TokenIds,
    *,
    mc_num: int = 128,
    batch_size: int = 32,
    cfg: float = 0.0,
    seed: int = 0,
) -> float:
    """LLaDA's Monte Carlo estimate of log p(answer | prompt) (a lower bound in expectation).

    mc_num=1 is what the reference uses for single-token answers (MMLU): it is then exact, the
    log-probability of the answer token at its masked slot.
    """
    pair = _mc_pair(model, prompt_ids, answer_ids, mc_num, batch_size, seed)
    mask_id = mask_token_id(model)
    losses = []
    for i in range(len(pair.draws)):
        logits = mask_predictor_logits(model, pair.noisy(i, mask_id), cfg=cfg, prompt_mask=pair.prompt_mask())
        losses.append(pair.batch_loss(i, logits))
    return -sum(losses) / len(losses)


# A forward's rows are computed the same bits whatever else is in the batch only when each GEMM already has
# enough rows on its own: on this project's CPU build (MKL), F.linear gives a row different bits when the
# whole input has fewer than ~16 rows (measured: up to 15 rows for 768 inputs). A batch of the likelihood's
# L tokens x batch_size rows is stacked with others only from this many token rows up (4x that margin).
MIN_ROWS_TO_STACK = 64


@torch.no_grad()
def mc_loglikelihood_many(
    model: torch.nn.Module,
    pairs: Sequence[tuple[TokenIds, TokenIds]],
    *,
    mc_num: int | Sequence[int] = 128,
    batch_size: int | Sequence[int] = 32,
    cfg: float = 0.0,
    seed: int = 0,
    max_tokens: int = 4096,
) -> list[float]:
    """`mc_loglikelihood` of every pair (mc_num / batch_size: one for all, or one per pair), the same
    floats, in fewer forwards: Monte Carlo batches of equal sequence length, from any pairs, are stacked
    into one forward of at most `max_tokens` tokens (rows x length; a batch over it runs alone). Each pair keeps its own draws (its generator seeded with
    `seed`, as alone), so its value does not depend on its neighbours. Stacking happens on the CPU only, and
    only for batches of at least MIN_ROWS_TO_STACK token rows (below that, or on other devices, where
    kernels may pick a different reduction order for a different row count, each batch runs alone)."""
    n = len(pairs)
    mc_nums = [mc_num] * n if isinstance(mc_num, int) else list(mc_num)
    batch_sizes = [batch_size] * n if isinstance(batch_size, int) else list(batch_size)
    if len(mc_nums) != n or len(batch_sizes) != n:
        raise DllmqError(f"Got {n} pairs but {len(mc_nums)} mc_num and {len(batch_sizes)} batch_size values.")
    built = [_mc_pair(model, p, a, m, b, seed) for (p, a), m, b in zip(pairs, mc_nums, batch_sizes)]
    mask_id = mask_token_id(model)
    stack = model_device(model).type == "cpu"
    groups: dict[int, list[tuple[int, int]]] = {}
    solo: list[list[tuple[int, int]]] = []
    for j, pair in enumerate(built):
        rows, length = pair.seq.shape
        for i in range(len(pair.draws)):
            if stack and rows * length >= MIN_ROWS_TO_STACK:
                groups.setdefault(length, []).append((j, i))
            else:
                solo.append([(j, i)])
    chunks = solo
    for units in groups.values():
        chunk: list[tuple[int, int]] = []
        for unit in units:
            if chunk and sum(built[j].seq.numel() for j, _ in chunk) + built[unit[0]].seq.numel() > max_tokens:
                chunks.append(chunk)
                chunk = []
            chunk.append(unit)
        chunks.append(chunk)
    losses: list[dict[int, float]] = [{} for _ in built]
    for chunk in chunks:
        noisy = torch.cat([built[j].noisy(i, mask_id) for j, i in chunk])
        prompt_mask = torch.cat([built[j].prompt_mask().expand_as(built[j].seq) for j, _ in chunk])
        logits = mask_predictor_logits(model, noisy, cfg=cfg, prompt_mask=prompt_mask)
        start = 0
        for j, i in chunk:
            rows = built[j].seq.shape[0]
            losses[j][i] = built[j].batch_loss(i, logits[start:start + rows])
            start += rows
    return [-sum(v[i] for i in range(len(v))) / len(v) for v in losses]


@torch.no_grad()
def bernoulli_mc_loglikelihood(
    model: torch.nn.Module,
    prompt_ids: TokenIds,
    answer_ids: TokenIds,
    *,
    mc_num: int = 128,
    batch_size: int = 32,
    eps: float = 1e-3,
    seed: int = 0,
) -> float:
    """Dream's Monte Carlo estimate of log p(answer | prompt), as Dream's evaluation computes it
    (its lm-eval model, nll_type "mc", log_type "ftb"; the study ran it for every Dream likelihood).

    Per batch of `batch_size` copies: one u ~ U(0, 1), row i gets t = (u + i / batch_size) mod 1 and
    p = (1 - eps) t + eps, and every answer token is masked independently with probability p; the
    sequence's first and last positions are never masked (Dream's evaluation appends EOS to the answer,
    so pass it as the answer's last token). Each masked token's cross-entropy is weighted 1 / p, rows
    are summed and divided by batch_size, and max(mc_num // batch_size, 1) batches averaged. Random
    draws come from a generator seeded with `seed`, in the order Dream's code draws them (u, then the
    [rows, length] uniforms)."""
    require_diffusion(model, "Monte Carlo likelihood")
    prompt, answer = as_ids(prompt_ids, "prompt_ids"), as_ids(answer_ids, "answer_ids")
    _check_pair(model, prompt, answer)
    if mc_num < 1 or batch_size < 1:
        raise DllmqError(f"mc_num ({mc_num}) and batch_size ({batch_size}) must be positive.")
    if not 0.0 <= eps < 1.0:
        raise DllmqError(f"eps must be in [0, 1), got {eps}.")
    mask_id = mask_token_id(model)
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    n_prompt = prompt.numel()
    seq = torch.cat([prompt, answer]).to(device).repeat(batch_size, 1)
    length = seq.shape[1]
    rows = torch.arange(batch_size, dtype=torch.float32)
    losses = []
    for _ in range(max(mc_num // batch_size, 1)):
        u = torch.rand(1, generator=generator)
        p = (1 - eps) * ((u + rows / batch_size) % 1) + eps                      # [batch]
        masked = torch.rand(batch_size, length, generator=generator) < p[:, None]
        masked[:, 0] = False
        masked[:, -1] = False
        masked[:, :n_prompt] = False                                              # only the answer is noised
        masked = masked.to(device)
        noisy = seq.masked_fill(masked, mask_id)
        logits = mask_predictor_logits(model, noisy)
        ce = F.cross_entropy(logits[masked].float(), seq[masked], reduction="none")
        weights = p.to(device)[:, None].expand(batch_size, length)[masked]
        losses.append(float((ce / weights).sum()) / batch_size)
    return -sum(losses) / len(losses)


@torch.no_grad()
def causal_loglikelihood(model: torch.nn.Module, prompt_ids: TokenIds, answer_ids: TokenIds) -> float:
    """Exact log p(answer | prompt) of a causal model: the answer tokens' summed log-probs."""
    prompt, answer = as_ids(prompt_ids, "prompt_ids"), as_ids(answer_ids, "answer_ids")
    _check_pair(model, prompt, answer)
    seq = torch.cat([prompt, answer]).to(model_device(model))[None]
    n_prompt = prompt.numel()
    logits = raw_logits(model, seq)[0, n_prompt - 1 : -1].float()
    return float(logits.log_softmax(-1).gather(-1, seq[0, n_prompt:, None]).sum())


def loglikelihood(
    model: torch.nn.Module,
    prompt_ids: TokenIds,
    answer_ids: TokenIds,
    *,
    mc_num: int = 128,
    batch_size: int = 32,
    cfg: float = 0.0,
    seed: int = 0,
) -> float:
    """log p(answer | prompt) for any family: exact for causal models, Monte Carlo otherwise."""
    if model.family.causal:
        return causal_loglikelihood(model, prompt_ids, answer_ids)
    return mc_loglikelihood(
        model, prompt_ids, answer_ids, mc_num=mc_num, batch_size=batch_size, cfg=cfg, seed=seed
    )


def loglikelihood_many(
    model: torch.nn.Module,
    pairs: Sequence[tuple[TokenIds, TokenIds]],
    *,
    mc_num: int = 128,
    batch_size: int = 32,
    cfg: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """`loglikelihood` over many (prompt, answer) pairs, with a progress bar.

    Every pair is scored with the same seed, so a pair's value does not depend on its neighbours
    or its position in the list.
    """
    return [
        loglikelihood(model, p, a, mc_num=mc_num, batch_size=batch_size, cfg=cfg, seed=seed)
        for p, a in tqdm(pairs, desc="loglikelihood", disable=not progress)
    ]


@torch.no_grad()
def greedy_matches(
    model: torch.nn.Module, prompt_ids: TokenIds, answer_ids: TokenIds, *, cfg: float = 0.0
) -> bool:
    """Whether greedy decoding from the prompt reproduces the answer exactly.

    Diffusion models decode the masked answer one token per step, most confident first, as
    LLaDA's evaluation does; causal models take the argmax at every answer position.
    """
    prompt, answer = as_ids(prompt_ids, "prompt_ids"), as_ids(answer_ids, "answer_ids")
    _check_pair(model, prompt, answer)
    device = model_device(model)
    if model.family.causal:
        seq = torch.cat([prompt, answer]).to(device)[None]
        logits = raw_logits(model, seq)[0, prompt.numel() - 1 : -1]
        return bool((logits.argmax(-1) == seq[0, prompt.numel():]).all())

    mask_id = mask_token_id(model)
    n_prompt = prompt.numel()
    seq = torch.cat([prompt, torch.full_like(answer, mask_id)]).to(device)[None]
    prompt_mask = torch.arange(seq.shape[1], device=device) < n_prompt
    for _ in range(answer.numel()):
        masked = seq == mask_id
        masked[:, :n_prompt] = False
        logits = mask_predictor_logits(model, seq, cfg=cfg, prompt_mask=prompt_mask)[masked].float()
        probs = logits.softmax(-1)
        confidence, tokens = probs.max(-1)
        best = int(confidence.argmax())
        positions = masked[0].nonzero().squeeze(1)
        seq[0, positions[best]] = tokens[best]
    return bool((seq[0, n_prompt:].cpu() == answer).all())


AR_ORDERS = ("ftb", "btf")   # Dream's nll_type ar_ftb / ar_btf: the answer scored front to back or back to front


@torch.no_grad()
def dream_ar_loglikelihood(
    model: torch.nn.Module,
    prompt_ids: TokenIds,
    answer_ids: TokenIds,
    *,
    order: str = "ftb",
    batch_size: int = 32,
) -> float:
    """Dream's autoregressive-order log p(answer | prompt) (its lm-eval model, nll_type `ar_ftb` /
    `ar_btf`, log_type "ftb"): one row per answer token i; with `ftb` row i masks answer positions
    i.. (sees the prompt and answer[:i]), with `btf` positions ..i (sees answer[i+1:]); the sum over
    rows of log p(answer[i]) at position i. Deterministic; rows run `batch_size` at a time. The study's
    Dream evaluation appends EOS to the answer, so pass it as the answer's last token."""
    require_diffusion(model, "autoregressive-order likelihood")
    if order not in AR_ORDERS:
        raise DllmqError(f"order must be {' or '.join(AR_ORDERS)}, got {order!r}.")
    if batch_size < 1:
        raise DllmqError(f"batch_size ({batch_size}) must be positive.")
    prompt, answer = as_ids(prompt_ids, "prompt_ids"), as_ids(answer_ids, "answer_ids")
    _check_pair(model, prompt, answer)
    device = model_device(model)
    n_prompt, n = prompt.numel(), answer.numel()
    rows = torch.arange(n)[:, None]
    cols = torch.arange(n)[None, :]
    masked = cols >= rows if order == "ftb" else cols <= rows            # [n, n]: row i's masked answer slots
    noisy = torch.cat([prompt.repeat(n, 1), answer.repeat(n, 1).masked_fill(masked, mask_token_id(model))], 1)
    total = 0.0
    for start in range(0, n, batch_size):
        chunk = noisy[start:start + batch_size].to(device)
        logits = mask_predictor_logits(model, chunk)                     # [b, n_prompt + n, V]
        i = torch.arange(start, start + chunk.shape[0], device=device)
        scored = logits[torch.arange(chunk.shape[0], device=device), n_prompt + i].float()
        total += float(F.cross_entropy(scored, answer.to(device)[i], reduction="sum"))
    return -total
