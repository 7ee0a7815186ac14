"""dllmq.train: the tokenizer, the corpus (disjoint from the mini benchmark), the training loop."""
from __future__ import annotations

import json
import random

import pytest
import torch

from dllmq.evaluate.mini import load_items
from dllmq.train import corpus
from dllmq.train.loop import (
    Batches,
    TrainConfig,
    forward_noise,
    learning_rate,
    sft_example,
    train,
)
from dllmq.train.tokenizer import SPECIAL_TOKENS, train_tokenizer

TEXT = ("Question: What is 17 + 25? Answer: 42\n"
        "def add_7(x):\n    \"\"\"Return x plus 7.\"\"\"\n    return x + 7\n"
        "Achilles (Ἀχιλλεύς) was a hero of the Trojan War — naïve café, 1,234.5 tabs\there.")


@pytest.fixture(scope="module")
def small_tokenizer():
    rng = random.Random(0)
    texts = [d[:3000] for d in corpus.wiki_documents("train")[:10]]
    texts += [corpus.math_item(rng, False).text for _ in range(300)]
    texts += [corpus.code_item(rng, False).text for _ in range(100)]
    return train_tokenizer(texts, vocab_size=600)


def test_tokenizer_round_trips_and_reloads(small_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tok = small_tokenizer
    ids = tok(TEXT)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    # digits are single tokens, so arithmetic sees every digit
    digits = [t for t in tok.convert_ids_to_tokens(tok("12345 + 678", add_special_tokens=False)["input_ids"])
              if any(c.isdigit() for c in t)]
    assert digits == list("12345678")
    # LLaDA's special tokens, ids 0..5, and its chat template
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(6))
    assert (tok.bos_token, tok.eos_token, tok.mask_token) == ("<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>")
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    tok.save_pretrained(str(tmp_path))
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert again(TEXT)["input_ids"] == ids
    assert again.mask_token_id == tok.mask_token_id


def test_forward_noise_masks_with_probability_t():
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(4000).reshape(8, 500) % 50 + 10
    allowed = torch.zeros_like(ids, dtype=torch.bool)
    allowed[:, 100:] = True
    noisy, masked, p = forward_noise(ids, 3, g, allowed)
    assert not masked[:, :100].any()
    assert torch.equal(noisy[masked], torch.full((int(masked.sum()),), 3))
    assert torch.equal(noisy[~masked], ids[~masked])
    rate = masked[:, 100:].float().mean(1)
    assert torch.allclose(rate, p[:, 0], atol=0.08)  # each row masked at its own rate t


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert learning_rate(cfg, 0) == pytest.approx(0.1)
    assert learning_rate(cfg, 9) == pytest.approx(1.0)
    assert learning_rate(cfg, 100) == pytest.approx(0.1)
    values = [learning_rate(cfg, s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


TINY = dict(d_model=64, n_layers=1, n_heads=1, mlp_hidden_size=128, vocab_size=384, seq_len=64, batch_size=8,
            max_wiki_docs=4, max_python_docs=20, tokenizer_items=100, log_every=1, checkpoint_every=100,
            bf16_autocast=False, threads=1, lr=3e-3, warmup=3)


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_train_runs_end_to_end_loss_decreases_and_resumes_exactly(tmp_path):
    run = train(TrainConfig(out=str(tmp_path / "a"), steps=24, **TINY))
    losses = _losses(run)
    assert len(losses) == 24
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6 - 0.5
    assert (run / "final" / "config.json").is_file() and (run / "final" / "tokenizer.json").is_file()
    raw = json.loads((run / "final" / "config.json").read_text())
    assert raw["model_type"] == "llada" and raw["d_model"] == 64 and raw["mask_token_id"] == 2

    # interrupted after one step (minutes=0), then resumed: the same weights as in one go
    short = dict(TINY, lr=1e-3)
    ref = train(TrainConfig(out=str(tmp_path / "b"), steps=3, **short))
    cut = TrainConfig(out=str(tmp_path / "c"), steps=3, **short)
    train(cut, minutes=0)
    assert torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=False)["step"] == 1
    train(cut)
    a = torch.load(ref / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # instruct stage from the base run: SFT steps (prompt clean) and pre-training steps
    inst = train(TrainConfig(stage="instruct", init=str(run / "final"), out=str(tmp_path / "i"), steps=4,
                             pretrain_every=2, **{k: v for k, v in TINY.items() if k != "lr"}))
    kinds = [json.loads(line)["kind"] for line in (inst / "log.jsonl").read_text().splitlines()]
    assert kinds == ["pretrain", "sft", "pretrain", "sft"]
    chat_flag = lambda r: json.loads((r / "final" / "config.json").read_text())["dllmq_training"]["chat"]  # noqa: E731
    assert chat_flag(inst) is True
    # math mid-training in the base prompt format: the result is still a base model
    mid = train(TrainConfig(stage="instruct", init=str(run / "final"), out=str(tmp_path / "m"), steps=2,
                            sft_format="plain", sft_mix={"math": 1.0}, **{k: v for k, v in TINY.items() if k != "lr"}))
    assert chat_flag(mid) is False


def test_other_settings_refuse_to_resume(tmp_path):
    from dllmq.errors import DllmqError

    out = tmp_path / "r"
    out.mkdir()
    (out / "train_config.json").write_text(json.dumps({"steps": 5, "out": str(out)}))
    with pytest.raises(DllmqError, match="other settings"):
        train(TrainConfig(out=str(out), steps=6, **TINY))


def test_mixtures_are_validated():
    from dllmq.errors import DllmqError

    with pytest.raises(DllmqError, match="sft-mix"):
        TrainConfig(stage="instruct", sft_mix={"poetry": 1.0})
    with pytest.raises(DllmqError, match="--mix"):
        TrainConfig(mix={"wiki": -1.0})
    assert TrainConfig(sft_mix={"math": 1.0}).sft_mix == {"math": 1.0}


def test_sft_rows_mask_only_the_response(small_tokenizer):
    cfg = TrainConfig(batch_size=6, seq_len=1024)  # no row cut (the small test tokenizer makes long rows)
    batches = Batches(cfg, small_tokenizer, corpus.wiki_documents("train")[:3], [])
    ids, response = batches.sft(0)
    eot = small_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    for row, resp in zip(ids, response):
        start = int(resp.float().argmax())
        prompt = small_tokenizer.decode(row[:start])
        assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        assert resp[start:].all() and not resp[:start].any()
        assert eot in row[start:].tolist()


# ---------------------------------------------------------------------------------------------
# no held-out item in the training data
# ---------------------------------------------------------------------------------------------

def test_benchmark_items_are_in_the_heldout_key_space():
    for task in ("mini_math", "mini_code"):
        items = load_items(task)
        assert len(items) >= 300
        assert all(corpus.is_heldout(item["key"]) for item in items)
        assert len({item["key"] for item in items}) == len(items)


def test_training_generators_never_produce_benchmark_items():
    rng = random.Random(123)
    math_q = {item["question"].split("?")[0] for item in load_items("mini_math")
              if item["key"].split("/")[1] in ("add", "sub", "add3")}
    code_names = {item["name"] for item in load_items("mini_code")}
    heldout_math = {item["key"] for item in load_items("mini_math")}
    for _ in range(20000):
        m = corpus.math_item(rng, heldout=False)
        assert m.key not in heldout_math and not corpus.is_heldout(m.key)
        assert m.question.split("?")[0] not in math_q
    for _ in range(5000):
        c = corpus.code_item(rng, heldout=False)
        assert c.name not in code_names and not corpus.is_heldout(c.key)
    # the SFT generator draws from the same training space
    wiki = corpus.wiki_documents("train")[:2]
    for _ in range(2000):
        prompt, _ = sft_example(rng.choice(("math", "code")), rng, wiki)
        assert prompt.split("?")[0] not in math_q
        assert not any(f"def {n}(" in prompt for n in code_names)


def test_general_items_come_from_articles_never_trained_on():
    train_text = "\n".join(corpus.wiki_documents("train"))
    train_titles = {d.split("\n", 1)[0] for d in corpus.wiki_documents("train")}
    for item in load_items("mini_general"):
        title, context = item["context"].split("\n", 1)
        assert title not in train_titles
        snippet = context[-80:]
        assert len(snippet) > 40 and snippet not in train_text
        assert len(item["choices"]) == 4 and 0 <= item["label"] < 4


def test_residual_norms_come_from_the_family():
    from dllmq.models.registry import get_family
    from dllmq.train.export import extras_markdown, residual_norm_paths

    paths = residual_norm_paths(get_family("llada"), 2)
    assert paths == {"model.transformer.blocks.0.attn_norm", "model.transformer.blocks.1.attn_norm",
                     "model.transformer.ln_f"}
    stat = {"max": 1.0, "channel": 0, "ratio_to_median": 2.0}
    acts = {"model.transformer.ln_f": stat, "model.transformer.blocks.0.ff_out": {**stat, "ratio_to_median": 9.0}}
    text = extras_markdown({"mini_math": {}}, None, acts, paths)
    assert "| model.transformer.ln_f |" in text and "| model.transformer.blocks.0.ff_out |" not in text


# ---------------------------------------------------------------------------------------------
# SFT batching (sft_batches) and runs recorded before the setting existed
# ---------------------------------------------------------------------------------------------

def _chat_ids(tok, prompt, response):
    p = tok(tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False, verbose=False)["input_ids"]
    r = tok(response, add_special_tokens=False, verbose=False)["input_ids"] + [tok.convert_tokens_to_ids("<|eot_id|>"),
                                                                               tok.eos_token_id]
    return p, r


def _plain_ids(tok, prompt, response):
    return ([tok.bos_token_id] + tok(prompt, add_special_tokens=False, verbose=False)["input_ids"],
            tok(response, add_special_tokens=False, verbose=False)["input_ids"] + [tok.eos_token_id])


@pytest.mark.parametrize("mode,fmt,min_response", [("mixed", "chat", 0), ("by_kind", "chat", 8), ("by_kind", "plain", 8),
                                                    ("by_kind", "plain", 0), ("by_kind", "plain", 40)])
def test_sft_batches_match_a_row_by_row_reference(small_tokenizer, mode, fmt, min_response):
    """Each batch is the rows a plain loop draws (one kind per row, or one kind for the whole batch), each
    padded with EOS to the widest row and every response to at least `min_response` tokens, response from
    the assistant turn (or the prompt's end) to the end."""
    tok, wiki = small_tokenizer, corpus.wiki_documents("train")[:3]
    mix = {"general": 0.2, "math": 0.5, "code": 0.3}
    cfg = TrainConfig(stage="instruct", batch_size=5, seq_len=1024, sft_mix=mix, sft_batches=mode,
                      sft_format=fmt, sft_min_response=min_response)  # seq_len: no row cut
    batches = Batches(cfg, tok, wiki, [])
    for step in range(4):
        rng = random.Random((0 * 1_000_003 + step) * 7 + 1)
        draw = lambda: rng.choices(list(mix), list(mix.values()))[0]  # noqa: E731
        kind = draw() if mode == "by_kind" else None
        pair = _plain_ids if fmt == "plain" else _chat_ids
        rows = [pair(tok, *sft_example(kind or draw(), rng, wiki, fmt == "plain")) for _ in range(5)]
        width = max(max(len(p) + len(r) for p, r in rows), max(len(p) + min_response for p, _ in rows))
        ids, response = batches.sft(step)
        assert ids.shape == (5, width)
        for (p, r), row, resp in zip(rows, ids.tolist(), response.tolist()):
            assert row == p + r + [tok.eos_token_id] * (width - len(p) - len(r))
            assert resp == [False] * len(p) + [True] * (width - len(p))


def test_by_kind_batches_hold_one_kind_and_follow_the_mix(small_tokenizer):
    wiki = corpus.wiki_documents("train")[:3]
    cfg = TrainConfig(stage="instruct", batch_size=4, sft_mix={"math": 0.7, "code": 0.3}, sft_batches="by_kind")
    batches = Batches(cfg, small_tokenizer, wiki, [])
    kinds = []
    for step in range(60):
        ids, _ = batches.sft(step)
        is_code = ["Write the body of this Python function" in small_tokenizer.decode(row) for row in ids]
        assert len(set(is_code)) == 1  # never a math row padded to a code row's width
        kinds.append(is_code[0])
    assert 0.1 < sum(kinds) / len(kinds) < 0.5  # code is drawn for about 30 % of the batches


def test_runs_recorded_before_sft_batches_keep_their_batching(tmp_path):
    from dllmq.errors import DllmqError
    from dllmq.train.config import stored_settings
    from dllmq.train.export import train_command

    assert TrainConfig().sft_batches == "by_kind"  # new runs
    old_instruct = {"stage": "instruct", "init": "x", "steps": 2500}
    assert stored_settings(old_instruct)["sft_batches"] == "mixed"
    assert stored_settings({"stage": "base"})["sft_batches"] == "by_kind"  # unused there: nothing to reproduce
    assert "--sft-batches mixed" in train_command(old_instruct, "runs/instruct")
    assert "sft-batches" not in train_command({**old_instruct, "sft_batches": "by_kind"}, "runs/instruct")
    assert "sft-batches" not in train_command({"stage": "base"}, "runs/base")
    # and their EOS padding: the widest row only (sft_min_response 0); new runs pad responses to 8
    assert TrainConfig().sft_min_response == 8 and stored_settings(old_instruct)["sft_min_response"] == 0
    assert "--sft-min-response 0" in train_command(old_instruct, "runs/instruct")
    with pytest.raises(DllmqError, match="sft-min-response"):
        TrainConfig(sft_min_response=-1)
    # resuming an old instruct run needs its batching spelled out
    out = tmp_path / "old"
    out.mkdir()
    (out / "train_config.json").write_text(json.dumps({**old_instruct, "out": str(out)}))
    with pytest.raises(DllmqError, match="sft_batches"):
        train(TrainConfig(stage="instruct", init="x", out=str(out), steps=2500))
    with pytest.raises(DllmqError, match="sft-batches"):
        TrainConfig(sft_batches="sorted")


def test_plain_sft_pairs_are_what_the_base_benchmark_asks():
    from dllmq.evaluate.mini import code_program

    wiki = corpus.wiki_documents("train")[:2]
    for kind in ("math", "code", "general"):
        chat, plain = (sft_example(kind, random.Random(5), wiki, p) for p in (False, True))
        assert chat != plain
        if kind == "math":
            item = corpus.math_item(random.Random(5), heldout=False)
            assert plain == (item.prompt, f" {item.answer}") and plain[0].endswith("Answer:")
        if kind == "code":  # the base scorer cuts the continuation back to the reference function
            item = corpus.code_item(random.Random(5), heldout=False)
            assert code_program(plain[0], plain[1], chat=False) == item.prompt + item.body
        if kind == "general":
            assert chat == ("Continue the text: " + plain[0], plain[1][1:])
    with pytest.raises(Exception, match="sft-format"):
        TrainConfig(sft_format="json")


@pytest.mark.parametrize("fmt,min_response", [("chat", 0), ("plain", 0), ("chat", 8), ("plain", 8)])
def test_math_digit_probe_masks_exactly_the_answer_of_a_training_row(small_tokenizer, fmt, min_response):
    """benchmarks/math_digits.py lays an item out as the SFT batch does (same tokens), only the answer masked."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("math_digits", Path(__file__).parents[2] / "benchmarks/math_digits.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    tok, wiki = small_tokenizer, corpus.wiki_documents("train")[:2]
    cfg = TrainConfig(stage="instruct", batch_size=1, sft_mix={"math": 1.0}, sft_format=fmt, sft_min_response=min_response)
    ids, response = Batches(cfg, tok, wiki, []).sft(0)
    rng = random.Random((0 * 1_000_003 + 0) * 7 + 1)  # step 0's draws: the batch's kind, then the row's item
    rng.choices(["math"], [1.0])
    item = corpus.math_item(rng, heldout=False)
    mini = {"question": item.question, "prompt": item.prompt, "answer": item.answer}
    masked, answer = probe.answer_masked_row(tok, mini, chat=fmt == "chat", min_response=min_response)
    start = int(response[0].float().argmax())
    assert masked[:start] == ids[0, :start].tolist()
    assert masked[start:start + len(answer)] == [tok.mask_token_id] * len(answer)
    assert answer + masked[start + len(answer):] == ids[0, start:].tolist()


def test_a_card_reproduces_the_whole_chain_of_stages(tmp_path):
    """A model trained from another shipped model lists that model's training commands before its own, and
    its --init is the previous run's final/; a math mid-training (plain format) is told apart from an SFT."""
    from dllmq.train.export import INTRO, card_kind, reproduce_commands

    base = tmp_path / "dllmq-tiny"
    base.mkdir()
    (base / "README.md").write_text("# x\n\nReproduce:\n\n```bash\npython -m dllmq.train --stage base --out runs/base "
                                    "--steps 8000\npython -m dllmq.train.export runs/base src/dllmq/tiny/dllmq-tiny\n```\n")
    mid = {"stage": "instruct", "init": str(base), "sft_format": "plain", "steps": 3000}
    kind = card_kind("instruct", "llada", "plain")
    assert kind == "base-math" and card_kind("instruct", "dream", "plain") == "dream-math"
    assert card_kind("instruct", "llada") == "instruct" and card_kind("instruct", "dream") == "dream-instruct"
    lines = reproduce_commands(mid, kind, "dllmq-tiny").splitlines()
    assert lines[0] == "python -m dllmq.train --stage base --out runs/base --steps 8000"
    assert lines[1].startswith("python -m dllmq.train --stage instruct --out runs/base-math --init runs/base/final")
    assert "--sft-format plain" in lines[1] and "--steps 3000" in lines[1]
    assert lines[2] == "python -m dllmq.train.export runs/base-math src/dllmq/tiny/dllmq-tiny --quant-check --activations"
    # the next stage starts from the mid-trained model: its card holds three training commands
    (base / "README.md").write_text("Reproduce:\n\n```bash\n" + "\n".join(lines) + "\n```\n")
    inst = reproduce_commands({"stage": "instruct", "init": str(base), "steps": 2500}, "instruct", "dllmq-tiny-instruct")
    assert inst.splitlines()[2].startswith("python -m dllmq.train --stage instruct --out runs/instruct "
                                           "--init runs/base-math/final")
    # without a card to read, the init is the stage's usual one
    assert "--init runs/base/final" in reproduce_commands({"stage": "instruct", "init": str(tmp_path / "none")},
                                                          "instruct", "x")
    assert "{pad}" not in INTRO["base-math"].format(pad=8) and "8 tokens" in INTRO["dream-math"].format(pad=8)
