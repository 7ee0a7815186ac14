"""The Dream twin (stage `dream`): Dream's config from the AR twin's, the weight copy (GQA by mean-pooled K/V
heads, zero q/k/v biases, tied embedding), the shifted masked-diffusion and SFT losses against textbook
versions, and the run -> export -> load -> Dream sampler path, with its instruct version."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from dllmq.errors import DllmqError
from dllmq.models.loading import load_plain_model, save_model
from dllmq.models.modeling import init_weights
from dllmq.models.registry import build_model, parse_model_config
from dllmq.train.config import TrainConfig, dream_twin_config, llama_tiny_config
from dllmq.train.dream_twin import dream_from_llama, pool_heads
from dllmq.train.loop import EPS, pretrain_loss, sft_loss, train

TINY = dict(d_model=128, n_layers=1, n_heads=2, n_kv_heads=1, mlp_hidden_size=128, vocab_size=384, seq_len=64,
            batch_size=8, max_wiki_docs=4, max_python_docs=20, tokenizer_items=100, log_every=1,
            checkpoint_every=100, bf16_autocast=False, threads=1, lr=3e-3, warmup=3)
MASK = 2


class _Tok:  # the ids llama_tiny_config reads
    bos_token_id, eos_token_id, pad_token_id, mask_token_id = 0, 1, 1, MASK

    def __len__(self):
        return 100


def _llama(n_heads=4, seed=0):
    raw = llama_tiny_config(TrainConfig(stage="ar", d_model=64 * n_heads, n_heads=n_heads, n_layers=2,
                                        mlp_hidden_size=96, vocab_size=100), _Tok())
    model = build_model(parse_model_config(raw))
    init_weights(model, std=0.1, seed=seed)
    return model.eval(), raw


def _dream(n_heads=4, n_kv=2, seed=0):
    llama, raw = _llama(n_heads, seed)
    return dream_from_llama(llama, dream_twin_config(raw, MASK, n_kv)).eval(), llama


def test_config_is_dream_7b_shaped_as_the_ar_twin():
    llama = llama_tiny_config(TrainConfig(stage="ar", n_layers=6, vocab_size=2560), _Tok())
    raw = dream_twin_config(llama, MASK, 2)
    config = parse_model_config(raw)
    assert raw["model_type"] == "Dream" and raw["architectures"] == ["DreamModel"] and raw["mask_token_id"] == MASK
    assert config.family == "dream" and config.qkv_bias and config.tie_embeddings
    assert (config.hidden_size, config.n_layers, config.n_heads, config.n_kv_heads, config.head_dim,
            config.intermediate_size, config.vocab_size) == (256, 6, 4, 2, 64, 704, 2560)
    # the AR twin's 5,475,584 less half its K/V weights (6 layers x 2 x 256 x 128), plus q/k/v biases
    assert config.n_params == 5_475_584 - 6 * 2 * 256 * 128 + 6 * (256 + 128 + 128) == 5_085_440  # 10.2 MB bf16
    with pytest.raises(DllmqError, match="cannot be pooled"):
        dream_twin_config(llama, MASK, 3)
    with pytest.raises(DllmqError, match="model_type llama"):
        dream_twin_config(raw, MASK, 2)
    with pytest.raises(DllmqError, match="no mask token"):
        dream_twin_config(llama, None, 2)


def test_pool_heads_is_the_mean_of_each_group_of_heads():
    w = torch.randn(6 * 8, 5, generator=torch.Generator().manual_seed(0))
    pooled = pool_heads(w, n_heads=6, n_groups=2)
    heads = [w[h * 8:(h + 1) * 8] for h in range(6)]
    expected = torch.cat([(heads[0] + heads[1] + heads[2]) / 3, (heads[3] + heads[4] + heads[5]) / 3])
    assert torch.allclose(pooled, expected, atol=1e-6)
    assert torch.equal(pool_heads(w, 6, 6), w)


@torch.no_grad()
def test_copy_with_equal_heads_and_causal_attention_is_the_ar_model():
    llama, raw = _llama()
    for name, param in llama.named_parameters():  # make K/V heads equal within each pair (groups of 2 of 4)
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            param.copy_(param.view(2, 2, 64, -1)[:, :1].expand(2, 2, 64, -1).reshape(param.shape).clone())
    dream = dream_from_llama(llama, dream_twin_config(raw, MASK, 2)).eval()
    assert dream.family.name == "dream" and not dream.family.causal and dream.family.shift_logits
    ids = torch.tensor([[0, 5, 17, 42, 9, 1, 33, 3], [0, 3, 3, 3, 88, 60, 7, 8]])
    dream.family = dataclasses.replace(dream.family, causal=True)  # on this instance only
    assert torch.equal(dream(ids), llama(ids))
    del dream.family
    assert not dream.family.causal and not torch.allclose(dream(ids), llama(ids), atol=1e-3)  # it now sees ahead


@torch.no_grad()
def test_every_other_tensor_is_copied_and_biases_start_at_zero():
    dream, llama = _dream()
    source = llama.state_dict()
    assert dream.get_lm_head().weight is dream.get_embedding().weight
    for name, tensor in dream.state_dict().items():
        if name.endswith("bias"):
            assert name.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj") and not tensor.any(), name
        elif name.endswith(("k_proj.weight", "v_proj.weight")):
            assert torch.equal(tensor, pool_heads(source[name], 4, 2)) and tensor.shape[0] == 128, name
        else:
            assert torch.equal(tensor, source[name]), name


@torch.no_grad()
def test_tied_dream_saves_the_embedding_once_and_loads_tied(tmp_path):
    from safetensors import safe_open

    dream, _ = _dream(seed=3)
    save_model(dream, None, tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert "model.layers.0.self_attn.k_proj.bias" in keys
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert raw["model_type"] == "Dream" and raw["tie_word_embeddings"] is True
    loaded, _, family = load_plain_model(tmp_path / "m", dtype="float32")
    assert family.name == "dream" and loaded.get_lm_head().weight is loaded.get_embedding().weight
    ids = torch.tensor([[0, 4, 8, 15, 16, 23, 42]])
    assert torch.equal(loaded(ids), dream(ids))


def _noise(ids, allowed, seed):
    """forward_noise's draws, by hand: per row t ~ U(0,1], per token u; masked where u < (1-eps)t + eps."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(ids.shape[0], generator=g)
    u = torch.rand(ids.shape, generator=g)
    p = ((1 - EPS) * t + EPS)[:, None].expand(ids.shape)
    masked = (u < p) & allowed
    return ids.masked_fill(masked, MASK), masked, p


@torch.no_grad()
def test_pretrain_loss_reads_token_i_at_position_i_minus_1():
    dream, _ = _dream()
    ids = torch.randint(3, 100, (3, 10), generator=torch.Generator().manual_seed(1))
    allowed = torch.ones_like(ids, dtype=torch.bool)
    allowed[:, 0] = False  # nothing predicts the first token
    noisy, masked, p = _noise(ids, allowed, seed=5)
    logits = dream(noisy).double()
    total = 0.0
    for b in range(3):
        for i in range(1, 10):
            if masked[b, i]:
                total += float(torch.logsumexp(logits[b, i - 1], 0) - logits[b, i - 1, ids[b, i]]) / float(p[b, i])
    loss = pretrain_loss(dream, ids, MASK, torch.Generator().manual_seed(5))
    assert masked.sum() > 5 and float(loss) == pytest.approx(total / (3 * 9), rel=1e-5)


def test_shifted_loss_never_masks_the_first_token():
    dream, _ = _dream()
    seen = []
    real = dream.forward
    dream.forward = lambda noisy: seen.append(noisy) or real(noisy)
    ids = torch.randint(3, 100, (64, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        pretrain_loss(dream, ids, MASK, torch.Generator().manual_seed(0))
    masked = seen[0] == MASK
    assert not masked[:, 0].any() and masked[:, 1:].float().mean() > 0.3


@torch.no_grad()
def test_sft_loss_is_llada_sft_through_the_shifted_logits():
    dream, _ = _dream()
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[0, 4:], response[1, 6:] = True, True
    noisy, masked, p = _noise(ids, response, seed=7)
    logits = dream(noisy).double()
    total = 0.0
    for b in range(2):
        n = int(response[b].sum())
        for i in range(9):
            if masked[b, i]:
                total += float(torch.logsumexp(logits[b, i - 1], 0) - logits[b, i - 1, ids[b, i]]) / float(p[b, i]) / n
    loss = sft_loss(dream, ids, response, MASK, torch.Generator().manual_seed(7))
    assert masked.sum() > 0 and float(loss) == pytest.approx(total / 2, rel=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dream")
    ar = train(TrainConfig(stage="ar", out=str(root / "ar"), steps=2, **TINY))
    dream = train(TrainConfig(stage="dream", out=str(root / "dream"), init=str(ar / "final"), steps=16, **TINY))
    instruct = train(TrainConfig(stage="instruct", out=str(root / "di"), init=str(dream / "final"), steps=3, **TINY))
    return root, ar, dream, instruct


def test_dream_stage_starts_from_the_ar_twin_and_trains(runs):
    from dllmq.train.export import model_from_checkpoint

    _, ar, run, _ = runs
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 16 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    raw = json.loads((run / "final" / "config.json").read_text())
    assert raw["model_type"] == "Dream" and raw["num_key_value_heads"] == 1 and raw["tie_word_embeddings"]
    assert raw["dllmq_training"]["stage"] == "dream" and not raw["dllmq_training"]["chat"]
    trained, tok, step = model_from_checkpoint(run)
    assert step == 16 and trained.family.name == "dream"
    loaded, tok, family = load_plain_model(run / "final", dtype="float32")
    assert family.shift_logits and loaded.get_lm_head().weight is loaded.get_embedding().weight
    ids = torch.tensor([tok("def add_7(x):\n    return x + 7")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), trained.to(torch.bfloat16).float()(ids))
    ar_tok = load_plain_model(ar / "final").tokenizer
    assert len(ar_tok) == len(tok) and ar_tok("1 + 2 = 3")["input_ids"] == tok("1 + 2 = 3")["input_ids"]


def test_instruct_from_a_dream_base_is_a_dream_chat_model(runs):
    from dllmq.diffusion import generate_text

    _, _, _, run = runs
    raw = json.loads((run / "final" / "config.json").read_text())
    assert raw["model_type"] == "Dream" and raw["dllmq_training"] == {**raw["dllmq_training"], "stage": "instruct",
                                                                      "chat": True}
    kinds = [json.loads(line)["kind"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert kinds == ["pretrain", "sft", "sft"]
    model, tok, family = load_plain_model(run / "final", dtype="float32")
    assert family.name == "dream" and "<|start_header_id|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    [text] = generate_text(model, tok, ["What is 2 + 3?"], chat=True, max_new_tokens=4, steps=4)
    assert isinstance(text, str)


def test_export_card_and_mini_benchmark_take_the_dream_paths(runs, monkeypatch, record_samplers):
    from dllmq.evaluate import mini
    from dllmq.train import export
    from dllmq.train.export import export_model

    root, _, run, instruct = runs
    monkeypatch.setattr(export, "SUBSET", {"mini_general": 2, "mini_math": 2, "mini_code": 1})  # fast
    samplers = record_samplers
    monkeypatch.setattr(mini, "causal_loglikelihood", lambda *a: pytest.fail("the causal likelihood ran on Dream"))
    record = export_model(run, root / "dllmq-tiny-dream", progress=False, full_limit=2)
    assert record["full"]["mini_math"]["n"] == 2 and set(samplers) == {"dream"}
    card = (root / "dllmq-tiny-dream" / "README.md").read_text()
    assert "Dream's architecture" in card and "model_type: Dream" in card and "LLaDA's architecture" not in card
    assert "--stage dream --out runs/dream --init runs/ar/final" in card and "export runs/dream " in card
    assert "| 128 | 1 | 2 (64) | 1 |" in card and "(embedding and LM head tied)" in card
    loaded, _, family = load_plain_model(root / "dllmq-tiny-dream", dtype="float32")
    assert family.name == "dream"
    export_model(instruct, root / "dllmq-tiny-dream-instruct", progress=False, full_limit=1)
    card = (root / "dllmq-tiny-dream-instruct" / "README.md").read_text()
    assert "dllmq-tiny-instruct's SFT" in card
    assert "--stage instruct --out runs/dream-instruct --init runs/dream/final" in card


def test_dream_stage_refuses_a_missing_or_wrong_init(tmp_path, runs):
    _, _, dream, _ = runs
    with pytest.raises(DllmqError, match="needs --init"):
        train(TrainConfig(stage="dream", out=str(tmp_path / "a"), steps=1, **TINY))
    with pytest.raises(DllmqError, match="model_type llama"):
        train(TrainConfig(stage="dream", out=str(tmp_path / "b"), init=str(dream / "final"), steps=1, **TINY))
    with pytest.raises(DllmqError, match="--n-kv-heads"):
        TrainConfig(stage="dream", n_kv_heads=0)


def test_dllmq_generate_runs_the_dream_sampler(runs, monkeypatch):
    import functools
    import importlib

    from dllmq.cli import main

    generate = importlib.import_module("dllmq.diffusion.generate")  # the package exports a function of that name
    _, _, run, _ = runs
    calls = []
    real = generate.SAMPLERS["dream"]

    @functools.wraps(real)  # keeps the signature the dispatcher reads the sampler's settings from
    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setitem(generate.SAMPLERS, "dream", spy)
    assert main(["generate", str(run / "final"), "--prompt", "Question: What is 1 + 2? Answer:",
                 "--gen-length", "4"]) == 0
    assert len(calls) == 1 and calls[0]["max_new_tokens"] == 4 and calls[0]["steps"] == 4
