"""The Dream twin's starting point: the AR twin (transformers' Llama layout) copied into Dream's architecture.

Dream-7B starts from Qwen2.5-7B, whose module tree it keeps; here the AR twin plays Qwen2.5's part. The two
layouts share every tensor name (model.layers.N.self_attn.q_proj, mlp.gate_proj, norms, embedding, head),
so every tensor is copied as it is except where Dream's architecture differs from the AR twin's:

- Grouped-query attention: the AR twin has one key/value head per query head, Dream shares each key/value
  head among a group of query heads. Each group's K and V projections start as the mean of the AR heads
  in that group, as GQA uptraining initialises them (Ainslie et al., 2023, "GQA": mean-pooling the heads
  of a multi-head checkpoint). The query heads and the output projection are copied unchanged.
- q/k/v biases (Qwen2's, so Dream's): start at zero, so they change nothing until training moves them.

The attention mask (bidirectional) and the reading of the logits (shifted by one) are the family's, not
tensors; with causal attention and K/V heads already equal within each group, the copy computes exactly
the AR twin's logits (tests/train/test_train_dream.py).
"""
from __future__ import annotations

import torch

from dllmq.models.modeling import TransformerLM
from dllmq.models.registry import build_model, parse_model_config

POOLED = ("self_attn.k_proj.weight", "self_attn.v_proj.weight")


def pool_heads(weight: torch.Tensor, n_heads: int, n_groups: int) -> torch.Tensor:
    """[n_heads * d, in] -> [n_groups * d, in]: the mean of each run of n_heads / n_groups consecutive heads,
    the heads that share key/value head g under repeat_interleave (dllmq's and transformers' GQA)."""
    rows, n_in = weight.shape
    d = rows // n_heads
    return weight.reshape(n_groups, n_heads // n_groups, d, n_in).mean(1).reshape(n_groups * d, n_in)


@torch.no_grad()
def dream_from_llama(llama: TransformerLM, dream_config: dict) -> TransformerLM:
    """A Dream model of config.json `dream_config` (config.dream_twin_config) holding the Llama model's weights."""
    config = parse_model_config(dream_config)
    dream = build_model(config)
    source = llama.state_dict()
    n_heads, n_groups = config.n_heads, config.n_kv_heads
    for name, param in dream.state_dict().items():
        if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            param.zero_()
        elif name.endswith(POOLED):
            param.copy_(pool_heads(source[name], n_heads, n_groups))
        else:
            param.copy_(source[name])
    return dream
