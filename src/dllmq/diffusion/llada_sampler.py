"""LLaDA's semi-autoregressive sampler with low-confidence (or random) remasking.

The answer starts as `gen_length` mask tokens cut into blocks of `block_length`, decoded left to
right; within a block each step reveals a fixed number of tokens (a linear schedule), choosing the
masked positions where the model's prediction is most confident (or random ones).
"""
from __future__ import annotations

from collections.abc import Sequence

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
from dllmq.diffusion.kv_cache import BlockKVCache, check_kv_cache
from dllmq.diffusion.logits import (
    forbid_token,
    mask_predictor_logits,
    mask_token_id,
    model_device,
    positions_from_mask,
    require_diffusion,
)
from dllmq.diffusion.sampling import gumbel_argmax
from dllmq.errors import DllmqError

REMASKING = ("low_confidence", "random")


def linear_schedule(masked: Tensor, steps: int) -> Tensor:
    """[B, steps] tokens to reveal per step: masked // steps each, the first (masked % steps) one more."""
    base = (masked // steps).unsqueeze(1)
    remainder = (masked % steps).unsqueeze(1)
    extra = torch.arange(steps, device=masked.device).unsqueeze(0) < remainder
    return base + extra.long()


def top_per_row(confidence: Tensor, counts: Tensor) -> Tensor:
    """Bool mask of the counts[r] highest-confidence entries of each row r (never a -inf entry)."""
    order = torch.sort(confidence, dim=1, descending=True, stable=True).indices
    ranks = order.argsort(dim=1)
    return (ranks < counts.unsqueeze(1)) & (confidence > float("-inf"))


def check_llada_settings(
    gen_length: int, steps: int, block_length: int, remasking: str, temperature: float, cfg: float
) -> int:
    """Validate the settings; return the number of blocks."""
    check_positive(gen_length=gen_length, steps=steps, block_length=block_length)
    if gen_length % block_length:
        raise DllmqError(
            f"gen_length ({gen_length}) must be a multiple of block_length ({block_length}); "
            "choose a block length that divides it."
        )
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise DllmqError(
            f"steps ({steps}) must be a multiple of the number of blocks ({num_blocks} = "
            f"gen_length / block_length) so every block gets the same number of steps."
        )
    if remasking not in REMASKING:
        raise DllmqError(f"Unknown remasking {remasking!r}; use one of {', '.join(REMASKING)}.")
    if temperature < 0:
        raise DllmqError(f"temperature must be >= 0 (0 means greedy), got {temperature}.")
    if cfg < 0:
        raise DllmqError(f"cfg must be >= 0 (0 turns guidance off), got {cfg}.")
    return num_blocks


@torch.no_grad()
def llada_generate(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    gen_length: int = 128,
    steps: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg: float = 0.0,
    remasking: str = "low_confidence",
    seed: int = 0,
    progress: bool = False,
    callback: StepCallback | None = None,
    teacher_states: Sequence[Tensor] | None = None,
    kv_cache: str = "none",
    before_step: BeforeStep | None = None,
) -> Tensor:
    """Generate `gen_length` tokens after each prompt row; returns the full [B, P + gen_length] ids.

    `prompt_ids` is [B, P] (rows of equal length; left-pad and pass `attention_mask` for ragged
    prompts). The prompt is never changed and every mask is filled.

    `teacher_states` (one [B, P + gen_length] tensor per step, e.g. another model's states recorded
    with `callback`) teacher-forces the run: `callback` still sees this model's own choice at every
    step, but the next step starts from the teacher's state (dllmq.diffusion.trajectory).
    `before_step(i)` runs before step i's forward pass (i counts from 0 across the blocks).
    """
    require_diffusion(model, "LLaDA generation")
    num_blocks = check_llada_settings(gen_length, steps, block_length, remasking, temperature, cfg)
    check_kv_cache(kv_cache)
    device = model_device(model)
    prompt, attention_mask = prepare_prompt(prompt_ids, attention_mask, device)
    batch, n_prompt = prompt.shape
    check_length(model, n_prompt + gen_length)
    mask_id = mask_token_id(model)
    generator = make_generator(device, seed)

    x = torch.cat([prompt, prompt.new_full((batch, gen_length), mask_id)], dim=1)
    attention_mask, position_ids = positions_from_mask(extend_mask(attention_mask, gen_length))
    prompt_mask = torch.arange(x.shape[1], device=device) < n_prompt
    if attention_mask is not None:
        prompt_mask = prompt_mask & attention_mask  # guidance hides real prompt tokens only

    steps_per_block = steps // num_blocks
    bar = tqdm(total=steps, desc="llada generate", disable=not progress)
    step = 0
    cache = None if kv_cache == "none" else BlockKVCache(model, kv_cache, attention_mask, position_ids, cfg=cfg,
                                                           prompt_mask=prompt_mask)
    for block in range(num_blocks):
        start = n_prompt + block * block_length
        end = start + block_length
        schedule = linear_schedule((x[:, start:end] == mask_id).sum(1), steps_per_block)
        for i in range(steps_per_block):
            # candidates: masked positions of the current block (later blocks wait their turn)
            candidates = torch.zeros_like(x, dtype=torch.bool)
            candidates[:, start:end] = x[:, start:end] == mask_id
            if before_step is not None:
                before_step(step)
            if cache is None:
                logits = mask_predictor_logits(
                    model, x, attention_mask, position_ids, cfg=cfg, prompt_mask=prompt_mask
                )
                x = _reveal(x, logits, candidates, schedule[:, i], temperature, remasking, generator, mask_id)
            else:  # the block's logits only; a block's first step refreshes the cache
                logits = cache.logits(x, start, end, refresh=i == 0)
                x = x.clone()
                x[:, start:end] = _reveal(x[:, start:end], logits, candidates[:, start:end], schedule[:, i],
                                          temperature, remasking, generator, mask_id)
            step += 1
            bar.update(1)
            if callback is not None:
                callback(step, x.clone())
            if teacher_states is not None:
                x = teacher_states[step - 1].to(device)
    bar.close()
    return x


def _reveal(
    x: Tensor,
    logits: Tensor,
    candidates: Tensor,
    counts: Tensor,
    temperature: float,
    remasking: str,
    generator: torch.Generator,
    mask_id: int,
) -> Tensor:
    """Fill counts[r] of row r's candidate positions with the model's predictions."""
    cand_logits = forbid_token(logits[candidates], mask_id)  # [N, V]: only what can be revealed now
    tokens = gumbel_argmax(cand_logits, temperature, generator)
    if remasking == "low_confidence":
        # confidence from the un-noised distribution, of the (possibly sampled) token
        probs = cand_logits.float().softmax(-1)
        conf = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    else:
        conf = torch.rand(tokens.shape, device=x.device, generator=generator)
    confidence = torch.full(x.shape, float("-inf"), device=x.device)
    confidence[candidates] = conf
    proposal = x.clone()
    proposal[candidates] = tokens
    chosen = top_per_row(confidence, counts)
    return torch.where(chosen, proposal, x)
