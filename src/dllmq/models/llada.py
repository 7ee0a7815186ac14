"""LLaDA (GSAI-ML/LLaDA-8B-Base, -Instruct): bidirectional, MHA, SwiGLU, official OLMo-style key names."""
from __future__ import annotations

from torch import nn

from dllmq.models.config import ModelConfig, config_from_llada
from dllmq.models.family import SCORE_ATTENTION, SCORE_MLP, Family, LinearGroup, Role
from dllmq.models.modeling import Block, RMSNorm, TransformerLM, linear

FAMILY = Family(
    name="llada",
    model_types=("llada",),
    embed="model.transformer.wte",
    blocks="model.transformer.blocks",
    final_norm="model.transformer.ln_f",
    lm_head="model.transformer.ff_out",  # same leaf name as a block's down projection: match full paths
    groups=(
        LinearGroup(Role.ATTN_IN, ("q_proj", "k_proj", "v_proj"), source="attn_norm", scored_on=SCORE_ATTENTION,
                    clip_exempt=("q_proj", "k_proj")),
        LinearGroup(Role.ATTN_OUT, ("attn_out",), source="v_proj"),
        LinearGroup(Role.MLP_IN, ("ff_proj", "up_proj"), source="ff_norm", scored_on=SCORE_MLP),
        LinearGroup(Role.MLP_OUT, ("ff_out",), source="up_proj"),
    ),
    causal=False,
    shift_logits=False,
)


class LLaDABlock(Block):
    family = FAMILY

    def __init__(self, c: ModelConfig):
        super().__init__(c)
        h, kv = c.hidden_size, c.n_kv_heads * c.head_dim
        self.attn_norm = RMSNorm(h, c.norm_eps)
        self.q_proj = linear(h, c.n_heads * c.head_dim, c.qkv_bias)
        self.k_proj = linear(h, kv, c.qkv_bias)
        self.v_proj = linear(h, kv, c.qkv_bias)
        self.attn_out = linear(c.n_heads * c.head_dim, h)
        self.ff_norm = RMSNorm(h, c.norm_eps)
        self.ff_proj = linear(h, c.intermediate_size)   # gate (activated)
        self.up_proj = linear(h, c.intermediate_size)
        self.ff_out = linear(c.intermediate_size, h)    # down


class _Transformer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.hidden_size)
        self.blocks = nn.ModuleList(LLaDABlock(c) for _ in range(c.n_layers))
        self.ln_f = RMSNorm(c.hidden_size, c.norm_eps)
        self.ff_out = linear(c.hidden_size, c.vocab_size)


class LLaDAModelLM(TransformerLM):
    family = FAMILY

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model = nn.Module()
        self.model.transformer = _Transformer(config)


parse_config = config_from_llada
MODEL_CLASS = LLaDAModelLM
