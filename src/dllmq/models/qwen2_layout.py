"""The transformers Llama / Qwen2 module tree (model.layers.N.self_attn / mlp), shared by Dream and Llama."""
from __future__ import annotations

from torch import nn

from dllmq.models.config import ModelConfig
from dllmq.models.family import SCORE_ATTENTION, SCORE_MLP, Family, LinearGroup, Role
from dllmq.models.modeling import Block, RMSNorm, TransformerLM, linear


def qwen2_layout_family(name: str, model_types: tuple[str, ...], causal: bool, shift_logits: bool) -> Family:
    return Family(
        name=name,
        model_types=model_types,
        embed="model.embed_tokens",
        blocks="model.layers",
        final_norm="model.norm",
        lm_head="lm_head",
        groups=(
            LinearGroup(Role.ATTN_IN, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                        source="input_layernorm", scored_on=SCORE_ATTENTION,
                        clip_exempt=("self_attn.q_proj", "self_attn.k_proj")),
            LinearGroup(Role.ATTN_OUT, ("self_attn.o_proj",), source="self_attn.v_proj"),
            LinearGroup(Role.MLP_IN, ("mlp.gate_proj", "mlp.up_proj"), source="post_attention_layernorm",
                        scored_on=SCORE_MLP),
            LinearGroup(Role.MLP_OUT, ("mlp.down_proj",), source="mlp.up_proj"),
        ),
        causal=causal,
        shift_logits=shift_logits,
    )


def make_model_class(family: Family) -> type[TransformerLM]:
    """A model class with the Llama/Qwen2 tree for `family` (Dream and Llama differ only in the family)."""

    class Qwen2LayoutBlock(Block):
        def __init__(self, c: ModelConfig):
            super().__init__(c)
            h, q_out, kv = c.hidden_size, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
            self.input_layernorm = RMSNorm(h, c.norm_eps)
            self.self_attn = nn.Module()
            self.self_attn.q_proj = linear(h, q_out, c.qkv_bias)
            self.self_attn.k_proj = linear(h, kv, c.qkv_bias)
            self.self_attn.v_proj = linear(h, kv, c.qkv_bias)
            self.self_attn.o_proj = linear(q_out, h)
            self.post_attention_layernorm = RMSNorm(h, c.norm_eps)
            self.mlp = nn.Module()
            self.mlp.gate_proj = linear(h, c.intermediate_size)
            self.mlp.up_proj = linear(h, c.intermediate_size)
            self.mlp.down_proj = linear(c.intermediate_size, h)

    Qwen2LayoutBlock.family = family

    class Qwen2LayoutLM(TransformerLM):
        def __init__(self, config: ModelConfig):
            super().__init__(config)
            self.model = nn.Module()
            self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
            self.model.layers = nn.ModuleList(Qwen2LayoutBlock(config) for _ in range(config.n_layers))
            self.model.norm = RMSNorm(config.hidden_size, config.norm_eps)
            self.lm_head = linear(config.hidden_size, config.vocab_size)

    Qwen2LayoutLM.family = family
    return Qwen2LayoutLM
