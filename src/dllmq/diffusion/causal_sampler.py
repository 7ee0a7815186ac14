"""Plain autoregressive generation for causal models (the llama family), so that `generate`
works on every family. No KV cache: the model contract has none, and these models are small."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dllmq.diffusion.common import (
    StepCallback,
    check_length,
    check_positive,
    extend_mask,
    make_generator,
    prepare_prompt,
)
from dllmq.diffusion.logits import model_device, positions_from_mask, raw_logits
from dllmq.diffusion.sampling import check_sampling, sample_from_logits
from dllmq.errors import DllmqError


@torch.no_grad()
def causal_generate(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    stop_ids: Iterable[int] | None = None,
    seed: int = 0,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> Tensor:
    """Generate up to `max_new_tokens` tokens per row; returns [B, P + max_new_tokens] ids.

    A row that emits a stop id (default: the config's eos) is finished; its remaining slots are
    filled with the pad (or eos) token, and generation ends early once every row is finished.
    """
    if not model.family.causal:
        raise DllmqError(
            f"Autoregressive generation needs a causal model, but {model.family.name!r} is a "
            "diffusion family; use the llada or dream sampler."
        )
    check_positive(max_new_tokens=max_new_tokens)
    check_sampling(temperature, top_p, top_k)
    device = model_device(model)
    prompt, attention_mask = prepare_prompt(prompt_ids, attention_mask, device)
    batch, n_prompt = prompt.shape
    check_length(model, n_prompt + max_new_tokens)
    generator = make_generator(device, seed)

    eos = getattr(model.config, "eos_token_id", None)
    stops = set(stop_ids) if stop_ids is not None else ({eos} if eos is not None else set())
    pad = getattr(model.config, "pad_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    stop_tensor = torch.tensor(sorted(stops), dtype=torch.long, device=device)

    x = torch.cat([prompt, prompt.new_full((batch, max_new_tokens), pad)], dim=1)
    full_mask = extend_mask(attention_mask, max_new_tokens)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    bar = tqdm(total=max_new_tokens, desc="generate", disable=not progress)
    for i in range(max_new_tokens):
        end = n_prompt + i
        mask, positions = positions_from_mask(None if full_mask is None else full_mask[:, :end])
        logits = raw_logits(model, x[:, :end], mask, positions)[:, -1]
        _, token = sample_from_logits(
            logits, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator
        )
        x[:, end] = torch.where(finished, torch.full_like(token, pad), token)
        finished |= torch.isin(token, stop_tensor)
        bar.update(1)
        if callback is not None:
            callback(i + 1, x.clone())
        if bool(finished.all()):
            break
    bar.close()
    return x
