"""Reading a mask predictor: logits aligned so that position i predicts token i.

LLaDA's head predicts the token at its own position; Dream kept Qwen2's autoregressive head, so
its raw output at position i predicts token i+1. Every sampler and estimator goes through
`mask_predictor_logits` so that none of them has to know which family it is driving.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dllmq.errors import DllmqError


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless model)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def mask_token_id(model: torch.nn.Module) -> int:
    """The model's mask token id, or a clear error when its config has none."""
    mask_id = getattr(model.config, "mask_token_id", None)
    if mask_id is None:
        raise DllmqError(
            "The model's config has no mask_token_id; set it in config.json (LLaDA uses 126336, "
            "Dream 151666) to use it as a diffusion model."
        )
    return int(mask_id)


def require_diffusion(model: torch.nn.Module, what: str) -> None:
    """Refuse to run a diffusion procedure on a causal (autoregressive) model."""
    if model.family.causal:
        raise DllmqError(
            f"{what} needs a masked diffusion model (LLaDA or Dream), but this model is the "
            f"causal family {model.family.name!r}; use the causal variant instead."
        )


def positions_from_mask(attention_mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Normalise a padding mask: (None, None) when nothing is padded, else (mask, position_ids).

    Positions count real tokens only (left padding does not shift them), so a padded row sees
    the same positions as the same row unpadded.
    """
    if attention_mask is None:
        return None, None
    attention_mask = attention_mask.bool()
    if bool(attention_mask.all()):
        return None, None
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return attention_mask, position_ids


def raw_logits(
    model: torch.nn.Module,
    x: Tensor,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
) -> Tensor:
    """One forward pass; accepts models that return a tensor or an object with `.logits`."""
    out = model(x, attention_mask=attention_mask, position_ids=position_ids)
    return out.logits if hasattr(out, "logits") else out


def mask_predictor_logits(
    model: torch.nn.Module,
    x: Tensor,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    *,
    cfg: float = 0.0,
    prompt_mask: Tensor | None = None,
) -> Tensor:
    """Logits [B, L, V] where [:, i] is the distribution of token i.

    With `cfg > 0` this is classifier-free guidance: an unconditional copy of `x` with the
    prompt positions (`prompt_mask`, [L] or [B, L]) replaced by the mask token runs in the same
    forward pass (2B rows), and the result is `uncond + (cfg + 1) * (cond - uncond)`.
    """
    batch = x.shape[0]
    if cfg > 0:
        if prompt_mask is None:
            raise DllmqError(
                "Classifier-free guidance (cfg > 0) needs prompt_mask to know which positions to hide."
            )
        prompt_mask = prompt_mask.to(x.device).bool().expand_as(x)
        uncond = x.masked_fill(prompt_mask, mask_token_id(model))
        x = torch.cat([x, uncond], dim=0)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask], dim=0)
        if position_ids is not None:
            position_ids = torch.cat([position_ids, position_ids], dim=0)

    logits = raw_logits(model, x, attention_mask, position_ids)
    if model.family.shift_logits:
        # Dream: token i is read at position i-1; position 0 keeps its own row, as upstream does.
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)

    if cfg > 0:
        cond, uncond = logits[:batch], logits[batch:]
        logits = uncond + (cfg + 1) * (cond - uncond)
    return logits


def forbid_token(logits: Tensor, token_id: int) -> Tensor:
    """A copy of logits [..., V] in which `token_id` can never be chosen.

    Samplers forbid the mask token: a trained model gives it ~zero probability anyway, and a
    predicted mask would leave a position masked after its turn (a hole in the answer).
    """
    logits = logits.clone()
    logits[..., token_id] = float("-inf")
    return logits
