"""Built-in tiny random models whose configs are the real LLaDA-8B / Dream-7B / SmolLM2 configs scaled
down: same field names, head structure (MHA for LLaDA, 7:1 GQA for Dream), biases and special tokens."""
from __future__ import annotations

import copy

import torch

from dllmq.models.config import real_config
from dllmq.models.modeling import TransformerLM, init_weights
from dllmq.models.registry import build_model, parse_model_config
from dllmq.models.tiny_tokenizer import DREAM_TOKENS, LLAMA_TOKENS, LLADA_TOKENS, byte_level_tokenizer

# Per family: the real config it scales down, the shape overrides, its special tokens.
RANDOM_MODELS = {
    "random-llada": ("llada-8b", dict(d_model=128, n_heads=4, n_kv_heads=4, mlp_hidden_size=384, n_layers=2,
                                      max_sequence_length=1024), LLADA_TOKENS),
    # FFN 296 = 148 x 2: the Paley-Hadamard size class of Dream-7B's 18944 = 148 x 128.
    "random-dream": ("dream-7b", dict(hidden_size=112, num_attention_heads=7, num_key_value_heads=1,
                                      intermediate_size=296, num_hidden_layers=2, max_position_embeddings=1024),
                     DREAM_TOKENS),
    "random-llama": ("smollm2-135m", dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1,
                                          head_dim=32, intermediate_size=256, num_hidden_layers=2,
                                          max_position_embeddings=1024), LLAMA_TOKENS),
}


def random_config(name: str, **overrides) -> dict:
    """The official-style config.json dict of a built-in random model (overrides use official field names)."""
    base, shape, special = RANDOM_MODELS[name]
    raw = copy.deepcopy(real_config(base))
    raw.update(shape)
    tokenizer = byte_level_tokenizer(special)
    vocab = -(-len(tokenizer) // 64) * 64  # pad the embedding like the real models do
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id, "mask_token_id": tokenizer.mask_token_id}
    raw.update(ids)
    raw.update({"vocab_size": vocab, "embedding_size": vocab} if "d_model" in raw else {"vocab_size": vocab})
    raw.update(overrides)
    return raw


def random_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """(model, tokenizer) for a built-in random model; the same seed gives the same weights."""
    raw = random_config(name, **overrides)
    config = parse_model_config(raw)
    model: TransformerLM = build_model(config)
    init_weights(model, seed=seed)
    model.tie_weights()
    tokenizer = byte_level_tokenizer(RANDOM_MODELS[name][2])
    return model.to(dtype).eval(), tokenizer
