"""dllmq: quantize diffusion LLMs (LLaDA, Dream) and measure what each choice costs.

`import dllmq` is cheap (no torch): `load_model` and `save_model` are imported on first use."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from dllmq.errors import DllmqError

if TYPE_CHECKING:
    from dllmq.api import load_model
    from dllmq.models.loading import save_model

__version__ = "0.1.0"
__all__ = ["DllmqError", "__version__", "load_model", "save_model"]

_LAZY = {"load_model": "dllmq.api", "save_model": "dllmq.models.loading"}


def __getattr__(name: str):
    """The heavy entry points, imported when first asked for (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dllmq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
