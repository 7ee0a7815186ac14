"""The AR twin (stage `ar`): next-token objective, tied Llama layout, export round trip, exact resume,
and the base stage's data path (so the held-out checks of test_train.py cover it)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from dllmq.models.loading import load_plain_model, save_model
from dllmq.models.modeling import init_weights
from dllmq.models.registry import build_model, parse_model_config
from dllmq.train import loop
from dllmq.train.config import TrainConfig, llama_tiny_config
from dllmq.train.loop import Batches, causal_loss, train

TINY = dict(d_model=64, n_layers=1, n_heads=1, mlp_hidden_size=128, vocab_size=384, seq_len=64, batch_size=8,
            max_wiki_docs=4, max_python_docs=20, tokenizer_items=100, log_every=1, checkpoint_every=100,
            bf16_autocast=False, threads=1, lr=3e-3, warmup=3)


class _Tok:  # the ids llama_tiny_config reads
    bos_token_id, eos_token_id, pad_token_id = 0, 1, 1

    def __len__(self):
        return 100


def _tiny_llama(seed=0):
    raw = llama_tiny_config(TrainConfig(stage="ar", d_model=64, n_heads=1, n_layers=2, mlp_hidden_size=96,
                                        vocab_size=100), _Tok())
    model = build_model(parse_model_config(raw))
    init_weights(model, std=0.2, seed=seed)
    return model


def test_config_is_a_tied_llama_of_the_tiny_size():
    raw = llama_tiny_config(TrainConfig(stage="ar", n_layers=6, vocab_size=2560), _Tok())
    config = parse_model_config(raw)
    assert raw["model_type"] == "llama" and raw["architectures"] == ["LlamaForCausalLM"]
    assert config.family == "llama" and config.tie_embeddings and not config.qkv_bias
    assert (config.hidden_size, config.n_layers, config.n_heads, config.n_kv_heads, config.head_dim,
            config.intermediate_size, config.vocab_size) == (256, 6, 4, 4, 64, 704, 2560)
    # dllmq-tiny (6,130,944 parameters) less its separate LM head (2560 x 256): 11 MB of bf16
    assert config.n_params == 6_130_944 - 2560 * 256 == 5_475_584


@torch.no_grad()
def test_causal_loss_is_the_mean_next_token_cross_entropy():
    model = _tiny_llama().eval()
    ids = torch.tensor([[0, 5, 17, 42, 9, 1], [0, 3, 3, 3, 88, 60]])
    total, count = 0.0, 0
    for row in ids:
        for i in range(len(row) - 1):  # the prefix alone: what a causal model sees when predicting row[i + 1]
            logits = model(row[None, :i + 1])[0, -1].double()
            total += float(torch.logsumexp(logits, 0) - logits[row[i + 1]])
            count += 1
    assert float(causal_loss(model, ids)) == pytest.approx(total / count, rel=1e-5)
    # the loss at a position does not see later tokens
    changed = ids.clone()
    changed[:, -1] = 7
    assert float(causal_loss(model, changed)) != pytest.approx(float(causal_loss(model, ids)))
    assert torch.allclose(model(ids[:, :-1]), model(ids)[:, :-1], atol=1e-5)


def test_gradient_reaches_every_parameter_and_the_tied_head():
    model = _tiny_llama().train()
    assert model.get_lm_head().weight is model.get_embedding().weight
    causal_loss(model, torch.randint(2, 100, (2, 12), generator=torch.Generator().manual_seed(0))).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_tied_llama_saves_the_embedding_once_and_loads_tied(tmp_path):
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    model = _tiny_llama(seed=3).eval()
    save_model(model, None, tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    loaded, _, family = load_plain_model(tmp_path / "m", dtype="float32")
    assert family.name == "llama" and family.causal
    assert loaded.get_lm_head().weight is loaded.get_embedding().weight
    ids = torch.tensor([[0, 4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
        # transformers reads the same directory as the same model
        hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32).eval()
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
        assert torch.allclose(hf(ids).logits, model(ids), atol=1e-5)


def test_ar_stage_reads_the_base_stage_batches(tmp_path, monkeypatch):
    """The AR twin's data is the base model's, row for row: the same Batches.pretrain (whose generators
    stay in the training key space, test_train.py) at every step."""
    seen = []
    original = Batches.pretrain

    def recording(self, step):
        ids = original(self, step)
        seen.append((step, ids))
        return ids

    monkeypatch.setattr(Batches, "pretrain", recording)
    train(TrainConfig(stage="ar", out=str(tmp_path / "ar"), steps=3, **TINY))
    assert [s for s, _ in seen] == [0, 1, 2]
    ar_rows = [ids for _, ids in seen]
    seen.clear()
    train(TrainConfig(stage="base", out=str(tmp_path / "base"), steps=3, **TINY))
    assert all(torch.equal(a, b) for a, b in zip(ar_rows, (ids for _, ids in seen)))


def test_given_tokenizer_is_copied_into_the_run(tmp_path):
    run = train(TrainConfig(stage="base", out=str(tmp_path / "base"), steps=1, **TINY))
    ar = train(TrainConfig(stage="ar", out=str(tmp_path / "ar"), steps=1, tokenizer=str(run / "final"), **TINY))
    text = "Question: What is 17 + 25? Answer: 42"
    from transformers import AutoTokenizer

    a, b = (AutoTokenizer.from_pretrained(str(d)) for d in (run / "final", ar / "tokenizer"))
    assert a(text)["input_ids"] == b(text)["input_ids"] and len(a) == len(b)
    from dllmq.errors import DllmqError

    with pytest.raises(DllmqError, match="no tokenizer.json"):
        train(TrainConfig(stage="ar", out=str(tmp_path / "x"), steps=1, tokenizer=str(tmp_path), **TINY))


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_ar_training_lowers_the_loss_and_exports_a_causal_model(tmp_path):
    from dllmq.train.export import model_from_checkpoint

    run = train(TrainConfig(stage="ar", out=str(tmp_path / "ar"), steps=20, **TINY))
    losses = _losses(run)
    assert len(losses) == 20 and math.isclose(losses[0], math.log(384), rel_tol=0.1)  # starts near uniform
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.8
    raw = json.loads((run / "final" / "config.json").read_text())
    assert raw["model_type"] == "llama" and raw["tie_word_embeddings"] and raw["dllmq_training"]["stage"] == "ar"

    # the shipped directory (bf16) gives the training model's logits, rounded to bf16 as the export stores it
    trained, tokenizer, step = model_from_checkpoint(run)
    assert step == 20 and trained.family.name == "llama"
    trained = trained.to(torch.bfloat16).float()
    loaded, tok, family = load_plain_model(run / "final", dtype="float32")
    assert family.causal and loaded.get_lm_head().weight is loaded.get_embedding().weight
    ids = torch.tensor([tok("def add_7(x):\n    return x + 7")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), trained(ids))


def test_export_writes_a_causal_model_card(tmp_path):
    from dllmq.train.export import export_model

    run = train(TrainConfig(stage="ar", out=str(tmp_path / "ar"), steps=2, **TINY))
    record = export_model(run, tmp_path / "dllmq-tiny-ar", progress=False, full_limit=2)
    card = (tmp_path / "dllmq-tiny-ar" / "README.md").read_text()
    assert "autoregressive twin" in card and "model_type: llama" in card and "LLaDA's architecture" not in card
    assert "Tokenizer: byte-level BPE" in card and "1 torch threads" in card
    assert "python -m dllmq.train --stage ar --out runs/ar" in card and "export runs/ar" in card
    assert record["training"]["stage"] == "ar" and record["full"]["mini_math"]["n"] == 2
    loaded, _, family = load_plain_model(tmp_path / "dllmq-tiny-ar", dtype="float32")
    assert family.causal


def test_ar_resume_gives_the_state_of_an_uninterrupted_run(tmp_path):
    ref = train(TrainConfig(stage="ar", out=str(tmp_path / "ref"), steps=3, **TINY))
    cut = TrainConfig(stage="ar", out=str(tmp_path / "cut"), steps=3, **TINY)
    train(cut, minutes=0)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 1
    train(cut)
    a = torch.load(ref / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert _losses(ref) == _losses(tmp_path / "cut")


def test_mini_benchmark_runs_a_causal_model_through_the_causal_paths(tmp_path, monkeypatch, record_samplers):
    """Exact likelihood for the cloze and the causal sampler for generation (no LLaDA sampler, no MC draws)."""
    from dllmq.evaluate import mini

    run = train(TrainConfig(stage="ar", out=str(tmp_path / "ar"), steps=2, **TINY))
    model, tok, _ = load_plain_model(run / "final", dtype="float32")

    def refuse(*args, **kwargs):
        raise AssertionError("the Monte Carlo likelihood ran on a causal model")

    monkeypatch.setattr(mini, "mc_loglikelihood_many", refuse)
    samplers = record_samplers
    res = mini.evaluate_mini(model, tok, tasks=["mini_general", "mini_math"], limit=3, progress=False)
    assert {t: r["n"] for t, r in res.items()} == {"mini_general": 3, "mini_math": 3}
    assert samplers == ["causal"]
    # the cloze picks the choice of highest exact log-likelihood
    item = mini.load_items("mini_general", 1)[0]
    prompt = tok(item["context"])["input_ids"]
    scores = [loop_ll(model, prompt, tok(c, add_special_tokens=False)["input_ids"]) for c in item["choices"]]
    picks = []
    mini.score_general(model, tok, [item], progress=False, chosen=picks)
    assert picks == [max(range(4), key=scores.__getitem__)]


def loop_ll(model, prompt, answer):
    """log p(answer | prompt) token by token, by hand."""
    total, seq = 0.0, list(prompt)
    for token in answer:
        with torch.no_grad():
            total += float(model(torch.tensor([seq]))[0, -1].double().log_softmax(-1)[token])
        seq.append(token)
    return total


def test_ar_stage_is_known_and_validated():
    from dllmq.errors import DllmqError

    assert TrainConfig(stage="ar").stage == "ar"
    with pytest.raises(DllmqError, match="base, instruct, ar"):
        TrainConfig(stage="causal")
    assert loop.pretrain_objective.__doc__
