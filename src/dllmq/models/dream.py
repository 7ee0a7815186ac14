"""Dream (Dream-org/Dream-v0-Base-7B, -Instruct-7B): Qwen2.5 layout, bidirectional, GQA, q/k/v bias,
logits shifted by one (token i is predicted at position i-1)."""
from __future__ import annotations

from dllmq.models.config import config_from_qwen2_style
from dllmq.models.qwen2_layout import make_model_class, qwen2_layout_family

FAMILY = qwen2_layout_family("dream", ("Dream", "dream"), causal=False, shift_logits=True)
MODEL_CLASS = make_model_class(FAMILY)
MODEL_CLASS.__name__ = MODEL_CLASS.__qualname__ = "DreamModel"


def parse_config(raw: dict):
    return config_from_qwen2_style(raw, "dream")
