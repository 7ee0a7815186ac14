"""Input checks and set-up shared by the samplers."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dllmq.errors import DllmqError

# Called after every denoising step (or generated token) with the step index and a copy of the
# whole token tensor [B, L]; used for progress displays and by the tests to watch the order.
StepCallback = Callable[[int, Tensor], None]
# Called before every denoising step's forward pass with the step's 0-based index (steps count across
# LLaDA's blocks); staged precision (dllmq.quant.staged) switches the model's precision here.
BeforeStep = Callable[[int], None]


def prepare_prompt(
    prompt_ids: Tensor, attention_mask: Tensor | None, device: torch.device
) -> tuple[Tensor, Tensor | None]:
    """A [B, P] LongTensor (a 1-D prompt becomes one row) and its bool padding mask, on `device`."""
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long)
    if prompt.dim() == 1:
        prompt = prompt[None]
    if prompt.dim() != 2:
        raise DllmqError(f"prompt_ids must be [batch, length] token ids, got shape {tuple(prompt.shape)}.")
    if prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise DllmqError("The prompt is empty; give at least one prompt token (for example the BOS token).")
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask).bool()
        if attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
        if attention_mask.shape != prompt.shape:
            raise DllmqError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but the prompt has shape "
                f"{tuple(prompt.shape)}; pass one mask entry per prompt token."
            )
        if not bool(attention_mask.any(dim=1).all()):
            raise DllmqError("A prompt row is all padding; every row needs at least one real token.")
        attention_mask = attention_mask.to(device)
    return prompt.to(device), attention_mask


def extend_mask(attention_mask: Tensor | None, new_tokens: int) -> Tensor | None:
    """The padding mask grown by `new_tokens` real positions on the right."""
    if attention_mask is None:
        return None
    ones = attention_mask.new_ones(attention_mask.shape[0], new_tokens)
    return torch.cat([attention_mask, ones], dim=1)


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise DllmqError(f"{name} must be a positive integer, got {value!r}.")


def check_length(model: torch.nn.Module, total: int) -> None:
    limit = getattr(model.config, "max_seq_len", None)
    if limit is not None and total > limit:
        raise DllmqError(
            f"Prompt plus generation is {total} tokens, more than the model's max_seq_len of "
            f"{limit}; shorten the prompt or generate fewer tokens."
        )


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    """A private generator on the model's device, so sampling never touches global RNG state."""
    return torch.Generator(device=device).manual_seed(seed)
