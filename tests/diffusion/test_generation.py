"""Generation: every mask filled, prompt untouched, block order, schedules, seeds, text helpers."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _toy import EOS, EOT, IM_END, MASK, PAD, Recorder, ToyModel, toy_tokenizer  # noqa: E402

from dllmq.diffusion import (  # noqa: E402
    DREAM_ALGORITHMS,
    causal_generate,
    decode_generation,
    default_sampler,
    dream_generate,
    encode_prompts,
    format_prompt,
    generate,
    generate_text,
    linear_schedule,
    llada_generate,
    mask_predictor_logits,
)
from dllmq.diffusion.sampling import filter_top_k, filter_top_p, gumbel_argmax  # noqa: E402
from dllmq.errors import DllmqError  # noqa: E402

PROMPTS = torch.tensor([[3, 14, 15, 9, 26, 5], [2, 7, 1, 8, 28, 18]])


@pytest.fixture(scope="module")
def models():
    return {kind: ToyModel(kind) for kind in ("llada", "dream", "causal")}


def check_filled(out, prompt, gen_length):
    assert out.shape == (prompt.shape[0], prompt.shape[1] + gen_length)
    assert torch.equal(out[:, : prompt.shape[1]], prompt)
    assert not (out == MASK).any()


# ---------------------------------------------------------------- LLaDA sampler


@pytest.mark.parametrize("kind", ["llada", "dream"])
@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_llada_fills_every_mask_and_keeps_prompt(models, kind, remasking, temperature):
    out = llada_generate(models[kind], PROMPTS, gen_length=16, steps=8, block_length=8,
                         remasking=remasking, temperature=temperature)
    check_filled(out, PROMPTS, 16)


def test_llada_fills_with_cfg_in_one_forward_of_2b_rows(models):
    rec = Recorder(models["llada"])
    out = llada_generate(rec, PROMPTS, gen_length=8, steps=4, block_length=8, cfg=1.0)
    check_filled(out, PROMPTS, 8)
    assert len(rec.calls) == 4
    assert all(c.shape[0] == 2 * PROMPTS.shape[0] for c in rec.calls)
    # the unconditional half has its prompt hidden
    assert (rec.calls[0][2:, : PROMPTS.shape[1]] == MASK).all()


def test_llada_prompt_containing_mask_token_is_not_touched(models):
    prompt = PROMPTS.clone()
    prompt[:, 2] = MASK
    out = llada_generate(models["llada"], prompt, gen_length=8, steps=4, block_length=4)
    assert torch.equal(out[:, : prompt.shape[1]], prompt)
    assert not (out[:, prompt.shape[1]:] == MASK).any()


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_llada_respects_block_order(models, remasking):
    rec = Recorder(models["llada"])
    n_prompt, block, n_blocks = PROMPTS.shape[1], 4, 3
    out = llada_generate(rec, PROMPTS, gen_length=block * n_blocks, steps=6, block_length=block,
                         remasking=remasking, temperature=0.5)
    assert len(rec.calls) == 6
    for x in rec.calls + [out]:
        gen = x[:, n_prompt:].view(x.shape[0], n_blocks, block)
        has_mask = (gen == MASK).any(-1)      # [B, n_blocks]
        all_mask = (gen == MASK).all(-1)
        for j in range(n_blocks - 1):
            # while block j still has masks, every later block is entirely masked
            assert (~has_mask[:, j] | all_mask[:, j + 1:].all(-1)).all()


def test_llada_reveals_per_schedule(models):
    seen = []
    llada_generate(models["llada"], PROMPTS, gen_length=16, steps=6, block_length=8,
                   callback=lambda step, x: seen.append(x))
    start = torch.cat([PROMPTS, torch.full((2, 16), MASK)], dim=1)
    masks = [(x == MASK).sum(1) for x in [start] + seen]
    revealed = torch.stack([a - b for a, b in zip(masks, masks[1:])], dim=1)
    # 8 tokens per block over 3 steps: 3, 3, 2 per block
    assert revealed.tolist() == [[3, 3, 2, 3, 3, 2]] * 2


def test_linear_schedule():
    assert linear_schedule(torch.tensor([10, 7, 2]), 4).tolist() == [[3, 3, 2, 2], [2, 2, 2, 1], [1, 1, 0, 0]]
    assert linear_schedule(torch.tensor([12]), 3).sum().item() == 12


def test_llada_more_steps_than_tokens(models):
    out = llada_generate(models["llada"], PROMPTS, gen_length=4, steps=6, block_length=4)
    check_filled(out, PROMPTS, 4)


def test_llada_low_confidence_reveals_most_confident(models):
    model = models["llada"]
    n_prompt = PROMPTS.shape[1]
    seen = []
    llada_generate(model, PROMPTS, gen_length=8, steps=8, block_length=4,
                   callback=lambda step, x: seen.append(x))
    x0 = torch.cat([PROMPTS, torch.full((2, 8), MASK)], dim=1)
    with torch.no_grad():
        logits = mask_predictor_logits(model, x0).float()
    logits[..., MASK] = float("-inf")  # the sampler never predicts the mask token
    probs = logits.softmax(-1)
    conf, tokens = probs.max(-1)
    block = slice(n_prompt, n_prompt + 4)
    for r in range(2):
        expected = set((conf[r, block].topk(1).indices + n_prompt).tolist())
        revealed = set((seen[0][r] != MASK).nonzero().squeeze(1).tolist()) - set(range(n_prompt))
        assert revealed == expected
        pos = expected.pop()
        assert seen[0][r, pos] == tokens[r, pos]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_llada_deterministic_under_seed(models, temperature):
    kw = dict(gen_length=16, steps=16, block_length=8, temperature=temperature)
    a = llada_generate(models["llada"], PROMPTS, seed=1, **kw)
    b = llada_generate(models["llada"], PROMPTS, seed=1, **kw)
    assert torch.equal(a, b)
    c = llada_generate(models["llada"], PROMPTS, seed=2, **kw)
    assert torch.equal(a, c) == (temperature == 0)


def test_llada_left_padding_matches_unpadded(models):
    model = models["llada"]
    short = PROMPTS[1:, 2:]
    padded = torch.cat([torch.full((1, 2), PAD), short], dim=1)
    batch = torch.cat([PROMPTS[:1], padded])
    mask = torch.ones_like(batch, dtype=torch.bool)
    mask[1, :2] = False
    kw = dict(gen_length=8, steps=8, block_length=4)
    together = llada_generate(model, batch, attention_mask=mask, **kw)
    alone = llada_generate(model, short, **kw)
    assert torch.equal(together[1, 2:], alone[0])
    assert torch.equal(together[0], llada_generate(model, PROMPTS[:1], **kw)[0])


def test_llada_errors(models):
    m = models["llada"]
    cases = [
        (dict(gen_length=10, block_length=4, steps=4), "multiple of block_length"),
        (dict(gen_length=8, block_length=4, steps=3), "multiple of the number of blocks"),
        (dict(gen_length=0, block_length=4, steps=4), "gen_length must be a positive"),
        (dict(gen_length=8, block_length=4, steps=0), "steps must be a positive"),
        (dict(gen_length=8, block_length=-4, steps=4), "block_length must be a positive"),
        (dict(gen_length=8, block_length=4, steps=4, remasking="top"), "Unknown remasking"),
        (dict(gen_length=8, block_length=4, steps=4, temperature=-1.0), "temperature"),
        (dict(gen_length=8, block_length=4, steps=4, cfg=-1.0), "cfg"),
        (dict(gen_length=256, block_length=256, steps=4), "max_seq_len"),
    ]
    for kw, message in cases:
        with pytest.raises(DllmqError, match=message):
            llada_generate(m, PROMPTS, **kw)
    with pytest.raises(DllmqError, match="prompt is empty"):
        llada_generate(m, torch.zeros(1, 0, dtype=torch.long), gen_length=4, steps=4, block_length=4)
    with pytest.raises(DllmqError, match="attention_mask"):
        llada_generate(m, PROMPTS, attention_mask=torch.ones(2, 3, dtype=torch.bool),
                       gen_length=4, steps=4, block_length=4)
    with pytest.raises(DllmqError, match="causal"):
        llada_generate(models["causal"], PROMPTS, gen_length=4, steps=4, block_length=4)


def test_gumbel_argmax_samples_softmax_over_temperature():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    gen = torch.Generator().manual_seed(0)
    draws = gumbel_argmax(logits.expand(20000, 4), 2.0, gen)
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert torch.allclose(freq, (logits / 2).softmax(-1), atol=0.015)
    assert torch.equal(gumbel_argmax(logits[None], 0.0), torch.tensor([3]))


def test_top_k_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda lg: (lg > torch.finfo(lg.dtype).min).tolist()[0]  # noqa: E731
    assert keep(filter_top_k(logits, 2)) == [True, True, False, False]
    assert keep(filter_top_p(logits, 0.7)) == [True, True, False, False]
    assert keep(filter_top_p(logits, 0.45)) == [True, False, False, False]
    assert keep(filter_top_p(logits, 1.0)) == [True] * 4


# ---------------------------------------------------------------- Dream sampler


@pytest.mark.parametrize("kind", ["dream", "llada"])
@pytest.mark.parametrize("alg", DREAM_ALGORITHMS)
@pytest.mark.parametrize("sampling", [{}, dict(temperature=0.7, top_p=0.9, top_k=20), dict(alg_temp=0.5)])
def test_dream_fills_every_mask(models, kind, alg, sampling):
    out = dream_generate(models[kind], PROMPTS, max_new_tokens=12, steps=5, alg=alg, **sampling)
    check_filled(out, PROMPTS, 12)


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_dream_reveal_counts_follow_time_grid(models, alg):
    seen = []
    steps, new = 5, 12
    dream_generate(models["dream"], PROMPTS, max_new_tokens=new, steps=steps, alg=alg,
                   callback=lambda i, x: seen.append(x))
    t = torch.linspace(1, 1e-3, steps + 1)
    masked = new
    for i, x in enumerate(seen):
        expected = masked if i == steps - 1 else int(masked * (1 - t[i + 1] / t[i]))
        now = int((x[0] == MASK).sum())
        assert masked - now == expected
        masked = now
    assert masked == 0


def test_dream_first_step_uses_shifted_logits(models):
    model = models["dream"]
    seen = []
    dream_generate(model, PROMPTS[:1], max_new_tokens=40, steps=2, alg="maskgit_plus",
                   callback=lambda i, x: seen.append(x))
    x0 = torch.cat([PROMPTS[:1], torch.full((1, 40), MASK)], dim=1)
    with torch.no_grad():
        raw = model(x0)[0].float()
    raw[..., MASK] = float("-inf")
    raw = raw.softmax(-1)
    n = PROMPTS.shape[1]
    conf, tok = raw[n - 1 : -1].max(-1)  # position n + j is read at raw row n + j - 1
    top = conf.topk(int(40 * (1 - torch.linspace(1, 1e-3, 3)[1] / 1.0))).indices + n
    assert set(((seen[0][0, n:] != MASK).nonzero().squeeze(1) + n).tolist()) == set(top.tolist())
    assert torch.equal(seen[0][0, top], tok[top - n])


@pytest.mark.parametrize("alg", DREAM_ALGORITHMS)
def test_dream_deterministic_and_prompt_kept(models, alg):
    kw = dict(max_new_tokens=10, steps=4, alg=alg, temperature=0.5, seed=3)
    a = dream_generate(models["dream"], PROMPTS, **kw)
    b = dream_generate(models["dream"], PROMPTS, **kw)
    assert torch.equal(a, b)
    assert torch.equal(a[:, : PROMPTS.shape[1]], PROMPTS)


def test_dream_errors(models):
    m = models["dream"]
    for kw, message in [
        (dict(alg="greedy"), "Unknown alg"),
        (dict(steps=0), "steps must be a positive"),
        (dict(max_new_tokens=-1), "max_new_tokens must be a positive"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(eps=0.0), "eps"),
    ]:
        with pytest.raises(DllmqError, match=message):
            dream_generate(m, PROMPTS, **kw)


# ---------------------------------------------------------------- causal sampler and dispatcher


def test_causal_greedy_matches_manual_loop(models):
    model = models["causal"]
    out = causal_generate(model, PROMPTS, max_new_tokens=6, stop_ids=[])
    x = PROMPTS.clone()
    with torch.no_grad():
        for _ in range(6):
            x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, x)


def test_causal_stops_at_eos_and_pads(models):
    model = models["causal"]
    free = causal_generate(model, PROMPTS[:1], max_new_tokens=6, stop_ids=[])
    stop = int(free[0, PROMPTS.shape[1] + 1])  # pretend the 2nd generated token ends the answer
    out = causal_generate(model, PROMPTS[:1], max_new_tokens=6, stop_ids=[stop])
    n = PROMPTS.shape[1]
    assert out.shape == free.shape
    assert torch.equal(out[0, : n + 2], free[0, : n + 2])
    assert (out[0, n + 2:] == PAD).all()


def test_dispatcher_picks_sampler_by_family(models):
    assert [default_sampler(models[k]) for k in ("llada", "dream", "causal")] == ["llada", "dream", "causal"]
    tok = toy_tokenizer()
    a = generate(models["dream"], tok, PROMPTS, gen_length=8, steps=4, block_length=8)  # preset names
    b = dream_generate(models["dream"], PROMPTS, max_new_tokens=8, steps=4)
    assert torch.equal(a, b)
    c = generate(models["dream"], tok, PROMPTS, sampler="llada", max_new_tokens=8, steps=4, block_length=8)
    assert torch.equal(c, llada_generate(models["dream"], PROMPTS, gen_length=8, steps=4, block_length=8))
    d = generate(models["causal"], tok, PROMPTS, gen_length=5, steps=99)
    assert d.shape == (2, PROMPTS.shape[1] + 5)
    with pytest.raises(DllmqError, match="Unknown generation setting"):
        generate(models["llada"], tok, PROMPTS, gen_lenght=8)
    with pytest.raises(DllmqError, match="cannot drive"):
        generate(models["llada"], tok, PROMPTS, sampler="causal")
    with pytest.raises(DllmqError, match="cannot drive"):
        generate(models["causal"], tok, PROMPTS, sampler="dream")
    with pytest.raises(DllmqError, match="Unknown sampler"):
        generate(models["llada"], tok, PROMPTS, sampler="beam")
    with pytest.raises(DllmqError, match="disagree"):
        generate(models["llada"], tok, PROMPTS, gen_length=8, max_new_tokens=16)


# ---------------------------------------------------------------- text helpers


def test_format_prompt_and_missing_template():
    tok = toy_tokenizer()
    assert format_prompt(tok, "w1 w2") == "w1 w2"
    chat = format_prompt(tok, "w1 w2", chat=True)
    assert chat.startswith("<|im_start|> user w1 w2 <|im_end|>")
    assert chat.rstrip().endswith("<|im_start|> assistant")
    with pytest.raises(DllmqError, match="no chat template"):
        format_prompt(toy_tokenizer(chat=False), "w1", chat=True)


def test_encode_prompts_left_pads():
    ids, mask = encode_prompts(toy_tokenizer(), ["w1 w2 w3", "w4"])
    assert ids.tolist() == [[1, 2, 3], [PAD, PAD, 4]]
    assert mask.tolist() == [[True] * 3, [False, False, True]]


def test_decode_cuts_at_first_end_token():
    tok = toy_tokenizer()
    prompt = [[1, 2], [1, 2], [1, 2], [1, 2]]
    gen = [[5, 6, EOT, 7], [5, IM_END, 6, 6], [EOS, 5, 5, 5], [5, 6, 7, 8]]
    out = torch.tensor([p + g for p, g in zip(prompt, gen)])
    assert decode_generation(tok, out, 2) == ["w5 w6", "w5", "", "w5 w6 w7 w8"]
    assert decode_generation(tok, out, 2, stop_strings=["w6"]) == ["w5 ", "w5", "", "w5 "]


@pytest.mark.parametrize("kind", ["llada", "dream", "causal"])
def test_generate_text_end_to_end(models, kind):
    texts = generate_text(models[kind], toy_tokenizer(), ["w1 w2 w3", "w4"], chat=True,
                          gen_length=8, steps=4, block_length=8)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert not any("<|" in t for t in texts)
