"""The embedded models, shipped inside dllmq: `dllmq-tiny` (the default) and `dllmq-tiny-instruct`, small
masked diffusion models with exactly LLaDA's architecture and checkpoint layout (official config.json field
names, `model.transformer.blocks.N...` keys, bf16 safetensors); `dllmq-tiny-ar`, their autoregressive
twin in transformers' Llama layout; `dllmq-tiny-dream`, Dream's architecture adapted from the AR twin, and
`dllmq-tiny-dream-instruct`, its instruct model; all
trained by `python -m dllmq.train` on an offline, openly licensed
corpus. Each directory holds config.json, model.safetensors, the tokenizer, a model card (README.md) and
eval.json (its recorded mini benchmark accuracies).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from dllmq.errors import DllmqError

NAMES = ("dllmq-tiny", "dllmq-tiny-instruct", "dllmq-tiny-ar", "dllmq-tiny-dream", "dllmq-tiny-dream-instruct")
DEFAULT = "dllmq-tiny"
# Announced (issue 17) but not in this installation yet: shipped grids may name them, and the study skips
# their cells with `not_shipped`'s sentence instead of failing. A name moves to NAMES when its weights ship.
PLANNED: dict[str, str] = {}


def not_shipped(name: str) -> str | None:
    """Why a planned shipped model cannot be used here (one sentence), or None when `name` is not one."""
    if name in NAMES or name not in PLANNED:
        return None
    return (f"{name} ({PLANNED[name]}) is not shipped with this dllmq yet; its cells are skipped until a "
            "release that ships it")


def checkpoint_dir(name: str = DEFAULT) -> Path:
    """The directory of a shipped model (config.json, safetensors, tokenizer, model card)."""
    if name not in NAMES:
        raise DllmqError(f"Unknown built-in model {name!r}; the shipped models are {', '.join(NAMES)}.")
    path = Path(str(resources.files("dllmq.tiny").joinpath(name)))
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise DllmqError(
            f"The weights of {name} are missing from this dllmq installation ({path}); reinstall dllmq, or "
            "retrain them with `python -m dllmq.train` (see the model card in the source tree)."
        )
    return path
