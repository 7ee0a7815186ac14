"""One entry point for generation on every family: picks the sampler, maps the settings."""
from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from dllmq.diffusion.causal_sampler import causal_generate
from dllmq.diffusion.dream_sampler import dream_generate
from dllmq.diffusion.llada_sampler import llada_generate
from dllmq.diffusion.text import decode_generation, encode_prompts, format_prompt, stop_token_ids
from dllmq.errors import DllmqError

log = logging.getLogger(__name__)

SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "llada": llada_generate,
    "dream": dream_generate,
    "causal": causal_generate,
}
_NOT_SETTINGS = {"model", "prompt_ids", "attention_mask", "teacher_states"}
STAGED = "staged"   # a generation setting of the dispatcher itself: a staged model's schedule (dllmq.quant.staged)


def _settings_of(fn: Callable) -> set[str]:
    return set(inspect.signature(fn).parameters) - _NOT_SETTINGS


_ALL_SETTINGS = set().union(*(_settings_of(fn) for fn in SAMPLERS.values()), {STAGED})


def family_sampler(family) -> str:
    """The sampler of a model family: causal for causal families, dream for Dream (shifted logits),
    llada otherwise."""
    if family.causal:
        return "causal"
    return "dream" if family.name == "dream" or family.shift_logits else "llada"


def default_sampler(model: torch.nn.Module) -> str:
    """The sampler of the model's family (family_sampler)."""
    return family_sampler(model.family)


def _map_settings(name: str, settings: dict) -> dict:
    """Rename the length setting for the chosen sampler and drop settings it does not take.

    Task presets name the LLaDA settings (gen_length, block_length); a Dream or causal model gets
    gen_length as max_new_tokens, and block_length is ignored (logged) rather than refused.
    """
    settings = dict(settings)
    if settings.get("kv_cache", "none") != "none" and name != "llada":
        raise DllmqError(f"kv_cache {settings['kv_cache']!r} needs LLaDA's block-wise sampler; the {name} sampler "
                         "has no finished blocks to cache, so leave kv_cache at none.")
    length_name = "gen_length" if name == "llada" else "max_new_tokens"
    other = "max_new_tokens" if name == "llada" else "gen_length"
    if other in settings:
        value = settings.pop(other)
        if settings.setdefault(length_name, value) != value:
            raise DllmqError(
                f"gen_length and max_new_tokens disagree ({settings[length_name]} vs {value}); give only one."
            )
    unknown = sorted(set(settings) - _ALL_SETTINGS)
    if unknown:
        raise DllmqError(
            f"Unknown generation setting(s) {', '.join(unknown)}; known settings are "
            f"{', '.join(sorted(_ALL_SETTINGS))}."
        )
    accepted = _settings_of(SAMPLERS[name])
    ignored = sorted(set(settings) - accepted)
    if ignored:
        log.info("the %s sampler ignores %s", name, ", ".join(ignored))
    return {k: v for k, v in settings.items() if k in accepted}


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: Tensor,
    *,
    sampler: str | None = None,
    attention_mask: Tensor | None = None,
    **settings,
) -> Tensor:
    """Generate after `prompt_ids` [B, P] with the family's sampler (or `sampler`: "llada",
    "dream", "causal"); returns the full token ids. `tokenizer` (may be None) supplies the stop
    tokens of causal generation. A staged model (dllmq.quant.staged) switches precision per step by its
    schedule, or by `staged="fp:first=0.25"` when given."""
    name = sampler or default_sampler(model)
    if name not in SAMPLERS:
        raise DllmqError(f"Unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}.")
    if model.family.causal != (name == "causal"):
        kind = "causal" if model.family.causal else "diffusion"
        raise DllmqError(
            f"The {name} sampler cannot drive the {kind} family {model.family.name!r}; "
            f"leave sampler unset to use {default_sampler(model)!r}."
        )
    from dllmq.quant.staged import staged_of   # here: dllmq.quant itself generates (trajectory calibration)
    staged = settings.pop(STAGED, None)
    settings = _map_settings(name, settings)
    if staged is not None or staged_of(model) is not None:
        return _generate_staged(model, name, prompt_ids, attention_mask, staged, settings)
    if name == "causal" and "stop_ids" not in settings and tokenizer is not None:
        settings["stop_ids"] = stop_token_ids(tokenizer, model)
    return SAMPLERS[name](model, prompt_ids, attention_mask=attention_mask, **settings)


def _generate_staged(model, name: str, prompt_ids, attention_mask, staged, settings: dict) -> Tensor:
    """A staged model's generation: its precision switches before each step as the schedule (`staged`, else
    the model's own) says, and is left at the low-bit default afterwards."""
    from dllmq.quant.staged import staged_of, step_hook
    if name == "causal":
        raise DllmqError("Staged precision switches between denoising steps; the causal sampler has none.")
    steps = settings.get("steps", inspect.signature(SAMPLERS[name]).parameters["steps"].default)
    hook, outer = step_hook(model, steps, staged), settings.pop("before_step", None)

    def before_step(step: int) -> None:
        hook(step)
        if outer is not None:
            outer(step)
    try:
        return SAMPLERS[name](model, prompt_ids, attention_mask=attention_mask, before_step=before_step, **settings)
    finally:
        staged_of(model).control.high = False


def generate_text(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    chat: bool = False,
    stop_strings: Sequence[str] = (),
    sampler: str | None = None,
    **settings,
) -> list[str]:
    """Text in, text out: format (chat template if asked), left-pad, generate, decode and cut."""
    texts = [format_prompt(tokenizer, p, chat) for p in prompts]
    ids, mask = encode_prompts(tokenizer, texts, chat=chat)
    out = generate(
        model, tokenizer, ids, sampler=sampler, attention_mask=None if mask.all() else mask, **settings
    )
    return decode_generation(tokenizer, out, ids.shape[1], stop_strings=stop_strings, model=model)
