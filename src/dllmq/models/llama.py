"""Llama (transformers layout; e.g. SmolLM2): a causal autoregressive model, used to validate
quantization methods on real pretrained weights."""
from __future__ import annotations

from dllmq.models.config import config_from_qwen2_style
from dllmq.models.qwen2_layout import make_model_class, qwen2_layout_family

FAMILY = qwen2_layout_family("llama", ("llama",), causal=True, shift_logits=False)
MODEL_CLASS = make_model_class(FAMILY)
MODEL_CLASS.__name__ = MODEL_CLASS.__qualname__ = "LlamaForCausalLM"


def parse_config(raw: dict):
    return config_from_qwen2_style(raw, "llama")
