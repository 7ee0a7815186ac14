"""Native models: bidirectionality, agreement with transformers and a textbook forward, checkpoint round trips."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dllmq import load_model, save_model
from dllmq.models.config import real_config
from dllmq.models.modeling import apply_rope, rope_tables
from dllmq.models.qwen2_layout import make_model_class, qwen2_layout_family
from dllmq.models.random_models import random_config, random_model
from dllmq.models.registry import parse_model_config


def _ids(model, length=12, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, length), generator=gen)


def test_bidirectional_or_causal(family_model):
    name, model, _ = family_model
    ids = _ids(model)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 256
    with torch.no_grad():
        a, b = model(ids), model(changed)
    first_moved = (a[:, 0] - b[:, 0]).abs().max().item()
    if model.family.causal:
        assert first_moved == 0.0
        assert (a[:, -1] - b[:, -1]).abs().max() > 1e-6
    else:  # a diffusion model's first position sees the last token
        assert first_moved > 1e-6


@pytest.mark.parametrize("shard", [None, 200_000])
def test_checkpoint_round_trip(family_model, tmp_path, shard):
    name, model, tokenizer = family_model
    out = save_model(model, tokenizer, tmp_path / "ckpt", max_shard_bytes=shard)
    files = sorted(p.name for p in out.iterdir())
    if shard:
        assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    else:
        assert "model.safetensors" in files
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == real_config({"random-llada": "llada-8b", "random-dream": "dream-7b",
                                                "random-llama": "smollm2-135m"}[name])["model_type"]
    loaded, tok2, family = load_model(out)
    assert family is model.family
    ids = _ids(model)
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    assert tok2.decode(tok2.encode("round trip ü")) == "round trip ü"
    assert tok2.mask_token_id == model.config.mask_token_id


def test_official_key_names(tmp_path):
    from safetensors import safe_open

    model, tok = random_model("random-llada")
    out = save_model(model, tok, tmp_path / "m")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for leaf in ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out"):
        assert f"model.transformer.blocks.1.{leaf}.weight" in keys
    assert {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"} <= keys

    model, tok = random_model("random-dream")
    out = save_model(model, tok, tmp_path / "d")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.bias" in keys and "model.layers.0.mlp.down_proj.weight" in keys
    assert "lm_head.weight" in keys and "model.norm.weight" in keys


def test_real_configs_parse_to_known_sizes():
    llada = parse_model_config(real_config("llada-8b"))
    dream = parse_model_config(real_config("dream-7b"))
    assert (llada.hidden_size, llada.n_layers, llada.n_heads, llada.intermediate_size) == (4096, 32, 32, 12288)
    assert llada.mask_token_id == 126336 and llada.eos_token_id == 126081
    assert abs(llada.n_params / 1e9 - 8.02) < 0.01           # LLaDA-8B: 8.02B parameters
    assert (dream.n_kv_heads, dream.head_dim, dream.qkv_bias) == (4, 128, True)
    assert abs(dream.n_params / 1e9 - 7.62) < 0.01           # Qwen2.5-7B shape: 7.62B parameters
    assert dream.mask_token_id == 151666


def test_random_configs_keep_real_structure():
    llada = parse_model_config(random_config("random-llada"))
    dream = parse_model_config(random_config("random-dream"))
    assert llada.n_heads == llada.n_kv_heads and not llada.qkv_bias
    assert dream.n_heads // dream.n_kv_heads == 7 and dream.qkv_bias   # Dream-7B: 28 heads over 4 KV heads
    assert dream.intermediate_size % 148 == 0                           # Paley size class of 18944


def test_llama_matches_transformers(tmp_path):
    from transformers import LlamaForCausalLM

    model, tok = random_model("random-llama", seed=5)
    out = save_model(model, tok, tmp_path / "llama")
    reference = LlamaForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    ids = _ids(model, length=16)
    with torch.no_grad():
        ours, theirs = model(ids), reference(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)


def test_qwen2_layout_matches_transformers(tmp_path):
    """Dream's tree, biases, GQA and RoPE equal transformers' Qwen2 once both are made causal."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model, _ = random_model("random-dream", seed=6)
    causal = make_model_class(qwen2_layout_family("dream-causal", (), causal=True, shift_logits=False))(model.config)
    causal.load_state_dict(model.state_dict())
    raw = dict(model.config.raw, model_type="qwen2")
    reference = Qwen2ForCausalLM(Qwen2Config(**raw)).eval()
    reference.load_state_dict(model.state_dict(), strict=False)
    ids = _ids(model, length=16)
    with torch.no_grad():
        assert torch.allclose(causal(ids), reference(ids).logits, atol=1e-5, rtol=1e-4)


def _textbook_llada(model, ids):
    """LLaDA's forward written out step by step, with explicit per-head loops."""
    c, t = model.config, model.model.transformer
    x = t.wte.weight[ids]
    length = ids.shape[1]
    pos = torch.arange(length)
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))

    def rms(v, w):
        return w * v / torch.sqrt((v * v).mean(-1, keepdim=True) + c.norm_eps)

    def rope(v):  # v: [L, D]; rotate each (i, i + D/2) pair by pos * inv[i]
        out = v.clone()
        half = c.head_dim // 2
        for i in range(half):
            ang = pos * inv[i]
            a, b = v[:, i], v[:, i + half]
            out[:, i], out[:, i + half] = a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()
        return out

    for blk in t.blocks:
        h = rms(x, blk.attn_norm.weight)
        q, k, v = h @ blk.q_proj.weight.T, h @ blk.k_proj.weight.T, h @ blk.v_proj.weight.T
        heads = []
        for b in range(ids.shape[0]):
            per_head = []
            for hd in range(c.n_heads):
                sl = slice(hd * c.head_dim, (hd + 1) * c.head_dim)
                qh, kh = rope(q[b, :, sl]), rope(k[b, :, sl])
                att = torch.softmax(qh @ kh.T / math.sqrt(c.head_dim), dim=-1)  # no causal mask
                per_head.append(att @ v[b, :, sl])
            heads.append(torch.cat(per_head, dim=-1))
        x = x + torch.stack(heads) @ blk.attn_out.weight.T
        h = rms(x, blk.ff_norm.weight)
        x = x + (F.silu(h @ blk.ff_proj.weight.T) * (h @ blk.up_proj.weight.T)) @ blk.ff_out.weight.T
    return rms(x, t.ln_f.weight) @ t.ff_out.weight.T


def test_llada_matches_textbook_forward():
    model, _ = random_model("random-llada", seed=7, dtype=torch.float64)
    ids = _ids(model, length=10)
    with torch.no_grad():
        # RoPE tables are float32 whatever the model dtype (LLaDA's rope_full_precision), hence 1e-6
        assert torch.allclose(model(ids), _textbook_llada(model, ids), atol=1e-6)


def test_rope_is_a_rotation_of_relative_position():
    q, k = torch.randn(1, 1, 1, 32, dtype=torch.float64), torch.randn(1, 1, 1, 32, dtype=torch.float64)

    def score(i, j):
        ci, si = rope_tables(torch.tensor([[i]]), 32, 10000.0, torch.float64)
        cj, sj = rope_tables(torch.tensor([[j]]), 32, 10000.0, torch.float64)
        return (apply_rope(q, ci, si) * apply_rope(k, cj, sj)).sum()

    assert torch.allclose(score(3, 1), score(10, 8))
    assert torch.allclose(apply_rope(q, *rope_tables(torch.tensor([[5]]), 32, 1e4, torch.float64)).norm(), q.norm())


def test_padding_mask_isolates_padded_positions():
    model, _ = random_model("random-llada", seed=2)
    ids = _ids(model, length=8, batch=1)
    padded = torch.cat([ids, torch.full((1, 3), 7)], dim=1)
    mask = torch.tensor([[True] * 8 + [False] * 3])
    with torch.no_grad():
        assert torch.allclose(model(ids), model(padded, attention_mask=mask)[:, :8], atol=1e-5)


def test_bfloat16_load(saved_llada):
    path, model = saved_llada
    loaded, _, _ = load_model(path, dtype="bfloat16")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    ids = _ids(model)
    with torch.no_grad():
        assert (loaded(ids).float() - model(ids)).abs().max() < 0.1


def test_same_seed_same_random_model():
    a, _, _ = load_model("random-dream", seed=4)
    b, _, _ = load_model("random-dream", seed=4)
    c, _, _ = load_model("random-dream", seed=5)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_hub_id_offline_is_one_clear_error(monkeypatch, tmp_path):
    from dllmq.errors import DllmqError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(DllmqError, match="Hugging Face Hub"):
        load_model("GSAI-ML/LLaDA-8B-Instruct")


def test_tokenizer_naming_remote_code_falls_back_to_tokenizer_json(tmp_path):
    """Dream's tokenizer_config names a remote class; dllmq reads tokenizer.json instead of running code."""
    model, tok = random_model("random-dream")
    out = save_model(model, tok, tmp_path / "dream")
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "DreamTokenizer"
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    _, loaded_tok, _ = load_model(out)
    assert loaded_tok.encode("Dream ü") == tok.encode("Dream ü")
    assert loaded_tok.mask_token == tok.mask_token
