"""Dream's `diffusion_generate`: reveal masked tokens along a time grid from t=1 to t=eps.

At step i (time t -> s) a fraction 1 - s/t of the still-masked tokens is revealed: at random
positions ("origin") or at the most confident ones, with confidence the top probability
("maskgit_plus"), the top-1 minus top-2 margin ("topk_margin") or the negative entropy
("entropy"). The last step reveals whatever is left.
"""
from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dllmq.diffusion.common import (
    BeforeStep,
    StepCallback,
    check_length,
    check_positive,
    extend_mask,
    make_generator,
    prepare_prompt,
)
from dllmq.diffusion.llada_sampler import top_per_row
from dllmq.diffusion.logits import (
    forbid_token,
    mask_predictor_logits,
    mask_token_id,
    model_device,
    positions_from_mask,
    require_diffusion,
)
from dllmq.diffusion.sampling import check_sampling, sample_from_logits
from dllmq.errors import DllmqError

ALGORITHMS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def confidence_of(probs: Tensor, tokens: Tensor, alg: str) -> Tensor:
    """Per-position confidence [N] from probs [N, V] for a confidence-ordered algorithm."""
    if alg == "maskgit_plus":
        return probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if alg == "topk_margin":
        top2 = probs.topk(min(2, probs.shape[-1]), dim=-1).values
        return top2[:, 0] - (top2[:, 1] if top2.shape[1] > 1 else 0)
    # entropy: most certain (lowest entropy) first
    return (probs * torch.log(probs + 1e-10)).sum(-1)


@torch.no_grad()
def dream_generate(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 128,
    steps: int = 128,
    alg: str = "entropy",
    alg_temp: float | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    eps: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
    callback: StepCallback | None = None,
    before_step: BeforeStep | None = None,
) -> Tensor:
    """Generate `max_new_tokens` tokens after each prompt row; returns [B, P + max_new_tokens] ids.

    `alg_temp` > 0 draws the positions to reveal from softmax(confidence / alg_temp) instead of
    taking the most confident ones. `before_step(i)` runs before step i's forward pass (i from 0).
    """
    require_diffusion(model, "Dream generation")
    check_positive(max_new_tokens=max_new_tokens, steps=steps)
    if alg not in ALGORITHMS:
        raise DllmqError(f"Unknown alg {alg!r}; use one of {', '.join(ALGORITHMS)}.")
    if not 0 < eps < 1:
        raise DllmqError(f"eps must be in (0, 1), got {eps}.")
    if alg_temp is not None and alg_temp < 0:
        raise DllmqError(f"alg_temp must be >= 0, got {alg_temp}.")
    check_sampling(temperature, top_p, top_k)
    device = model_device(model)
    prompt, attention_mask = prepare_prompt(prompt_ids, attention_mask, device)
    batch, n_prompt = prompt.shape
    check_length(model, n_prompt + max_new_tokens)
    mask_id = mask_token_id(model)
    generator = make_generator(device, seed)
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, generator=generator)

    x = torch.cat([prompt, prompt.new_full((batch, max_new_tokens), mask_id)], dim=1)
    attention_mask, position_ids = positions_from_mask(extend_mask(attention_mask, max_new_tokens))
    gen_region = torch.arange(x.shape[1], device=device) >= n_prompt
    timesteps = torch.linspace(1, eps, steps + 1)

    for i in tqdm(range(steps), desc="dream generate", disable=not progress):
        masked = (x == mask_id) & gen_region
        if before_step is not None:
            before_step(i)
        logits = mask_predictor_logits(model, x, attention_mask, position_ids)
        last = i == steps - 1
        ratio = 1 - timesteps[i + 1] / timesteps[i]  # float32, as upstream
        if alg == "origin":
            p_reveal = 1.0 if last else float(ratio)
            draw = torch.rand(x.shape, device=device, generator=generator)
            chosen = masked & (draw < p_reveal)
            _, tokens = sample_from_logits(forbid_token(logits[chosen], mask_id), **sampling)
            x = x.clone()
            x[chosen] = tokens
        else:
            probs, tokens = sample_from_logits(forbid_token(logits[masked], mask_id), **sampling)
            confidence = torch.full(x.shape, float("-inf"), device=device)
            confidence[masked] = confidence_of(probs, tokens, alg)
            n_masked = masked.sum(1)
            counts = n_masked if last else (n_masked.float().cpu() * ratio).long().to(device)
            chosen = _pick(confidence, counts, alg_temp, generator)
            proposal = x.clone()
            proposal[masked] = tokens
            x = torch.where(chosen, proposal, x)
        if callback is not None:
            callback(i + 1, x.clone())
    return x


def _pick(confidence: Tensor, counts: Tensor, alg_temp: float | None, generator: torch.Generator) -> Tensor:
    """Positions to reveal: the counts[r] most confident of row r, or sampled when alg_temp > 0."""
    if not alg_temp:
        return top_per_row(confidence, counts)
    chosen = torch.zeros_like(confidence, dtype=torch.bool)
    weights = (confidence / alg_temp).softmax(-1)
    # keep every candidate drawable even when its weight underflows
    weights = torch.where(confidence > float("-inf"), weights.clamp_min(1e-30), 0.0)
    for r, k in enumerate(counts.tolist()):
        if k > 0:
            chosen[r, torch.multinomial(weights[r], k, generator=generator)] = True
    return chosen
