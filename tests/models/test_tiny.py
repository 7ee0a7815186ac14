"""The shipped models dllmq-tiny / dllmq-tiny-instruct: layout, size, and their recorded accuracies."""
from __future__ import annotations

import json

import pytest

from dllmq.errors import DllmqError
from dllmq.tiny import NAMES, checkpoint_dir

# A near-tie in a generated token can flip between CPUs / torch builds; more than this share of the
# recorded per-item outcomes changing is a regression (of the weights, the loader or the samplers).
MAX_FLIPPED = 0.1


def _shipped(name):
    return checkpoint_dir(name)  # the weights ship with the package: missing files are a failure


def test_unknown_name_is_refused():
    with pytest.raises(DllmqError, match="shipped models"):
        checkpoint_dir("dllmq-huge")


# The official checkpoint layout of each family a shipped model may have: (config fields, tied, tensors).
LAYOUTS = {
    "llada": ({"model_type": "llada"}, False,
              {"model.transformer.wte.weight", "model.transformer.ff_out.weight", "model.transformer.ln_f.weight",
               "model.transformer.blocks.0.attn_out.weight", "model.transformer.blocks.0.ff_proj.weight"}),
    # the AR twin: transformers' LlamaForCausalLM, embedding and LM head tied (stored once)
    "llama": ({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True}, True,
              {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.o_proj.weight",
               "model.layers.0.mlp.gate_proj.weight", "model.layers.0.post_attention_layernorm.weight"}),
    # the Dream twin: Dream-v0's fields and Qwen2 tensor names with q/k/v biases, tied like the AR twin
    "dream": ({"model_type": "Dream", "architectures": ["DreamModel"], "tie_word_embeddings": True}, True,
              {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.bias",
               "model.layers.0.self_attn.v_proj.bias", "model.layers.0.mlp.down_proj.weight"}),
}


@pytest.mark.parametrize("name", NAMES)
def test_shipped_checkpoint_has_its_familys_official_layout(name):
    from safetensors import safe_open

    from dllmq.models.config import read_config_json
    from dllmq.models.registry import get_family, parse_model_config

    path = _shipped(name)
    raw = read_config_json(path)
    config = parse_model_config(raw)
    fields, tied, tensors = LAYOUTS[config.family]
    assert {k: raw.get(k) for k in fields} == fields and raw["torch_dtype"] == "bfloat16"
    assert config.head_dim == 64 and config.tie_embeddings == tied
    if config.family == "dream":  # GQA and shifted logits: Dream's paths, not LLaDA's
        assert config.n_kv_heads < config.n_heads and get_family("dream").shift_logits
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert tensors <= keys
    assert (f"{get_family(config.family).lm_head}.weight" in keys) != tied  # a tied head is stored once
    for f in ("tokenizer.json", "tokenizer_config.json", "README.md", "eval.json"):
        assert (path / f).is_file(), f
    assert (path / "model.safetensors").stat().st_size < 13_000_000


def test_shipped_models_together_stay_within_the_budget():
    total = sum((_shipped(n) / "model.safetensors").stat().st_size for n in NAMES)
    assert total <= 60_000_000  # issue 17: all shipped weights together


@pytest.mark.parametrize("name", NAMES)
def test_shipped_weights_give_the_recorded_accuracies(name):
    from dllmq.models import load_plain_model
    from dllmq.train.export import SUBSET
    from dllmq.evaluate.mini import evaluate_mini

    path = _shipped(name)
    recorded = json.loads((path / "eval.json").read_text())["subset"]
    model, tokenizer, family = load_plain_model(path, dtype="float32")
    if family.is_diffusion:
        assert tokenizer.mask_token_id == model.config.mask_token_id
    for task, n in SUBSET.items():
        got = evaluate_mini(model, tokenizer, tasks=[task], limit=n, progress=False, return_samples=True)[task]
        correct = [s["correct"] for s in got["samples"]]
        assert got["n"] == recorded[task]["n"] == n
        flipped = sum(a != b for a, b in zip(correct, recorded[task]["correct"]))
        assert flipped <= max(1, MAX_FLIPPED * n), (task, got["acc"], recorded[task]["acc"], flipped)


@pytest.mark.parametrize("name", NAMES)
def test_recorded_accuracies_leave_room_to_measure_damage(name):
    """Quantization damage is measurable only above chance: code is (the 30 % target set for these models); general and
    math are recorded but did not reach their targets at this size (see the model card)."""
    full = json.loads((_shipped(name) / "eval.json").read_text())["full"]
    assert full["mini_code"]["acc"] >= 0.3
    assert {t: r["n"] for t, r in full.items()} == {"mini_general": 400, "mini_math": 400, "mini_code": 301}


def test_builtin_names_resolve_to_the_shipped_weights():
    from dllmq.api import load_model

    model, tokenizer, family = load_model()  # the default model is dllmq-tiny
    assert family.name == "llada" and model.config.mask_token_id == tokenizer.mask_token_id
    text = "Question: What is 2 + 3? Answer: 5"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
