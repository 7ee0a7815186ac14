"""mc_loglikelihood_many: the same floats as mc_loglikelihood pair by pair, whatever the neighbours."""
from __future__ import annotations

import pytest
import torch

from dllmq.diffusion import mc_loglikelihood, mc_loglikelihood_many
from dllmq.diffusion import likelihood as likelihood_module
from dllmq.evaluate.mini import MC_NUM, load_items
from dllmq.models.loading import load_plain_model
from dllmq.models.random_models import random_model
from dllmq.quant import QuantConfig, quantize


@pytest.fixture(scope="module")
def tiny():
    lm = load_plain_model("dllmq-tiny")
    return lm.model.eval(), lm.tokenizer


def _mini_general_pairs(tokenizer, n_items=6):
    pairs, mcs = [], []
    for item in load_items("mini_general", n_items):
        prompt = tokenizer(item["context"], add_special_tokens=True)["input_ids"]
        for choice in item["choices"]:
            answer = tokenizer(choice, add_special_tokens=False)["input_ids"]
            pairs.append((prompt, answer))
            mcs.append(1 if len(answer) == 1 else MC_NUM)
    return pairs, mcs


def _synthetic_pairs(seed=0):
    """Equal total lengths from different prompts/answers (so they stack), plus short ones that may not."""
    gen = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(5, 2000, (n,), generator=gen).tolist()  # noqa: E731
    return [(ids(30), ids(3)), (ids(31), ids(2)), (ids(29), ids(4)), (ids(33), ids(1)),
            (ids(5), ids(2)), (ids(6), ids(1)), (ids(50), ids(7))]


def _one_by_one(model, pairs, mcs, **kw):
    return [mc_loglikelihood(model, p, a, mc_num=m, batch_size=m, **kw) for (p, a), m in zip(pairs, mcs)]


def test_mini_general_pairs_stacked_equal_pair_by_pair(tiny):
    model, tokenizer = tiny
    pairs, mcs = _mini_general_pairs(tokenizer)
    lengths = [len(p) + len(a) for p, a in pairs]
    assert len(set(lengths)) < len(lengths)                           # some forwards are shared
    assert mc_loglikelihood_many(model, pairs, mc_num=mcs, batch_size=mcs) == _one_by_one(model, pairs, mcs)


@pytest.mark.parametrize("max_tokens", [1, 150, 4096])
@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_synthetic_pairs_any_stacking_equal_pair_by_pair(tiny, max_tokens, cfg):
    model, _ = tiny
    pairs = _synthetic_pairs()
    mcs = [4, 4, 4, 1, 4, 1, 8]
    expected = _one_by_one(model, pairs, mcs, cfg=cfg, seed=3)
    got = mc_loglikelihood_many(model, pairs, mc_num=mcs, batch_size=mcs, cfg=cfg, seed=3, max_tokens=max_tokens)
    assert got == expected
    # a pair's value does not depend on its neighbours or its place in the list
    assert mc_loglikelihood_many(model, pairs[::-1], mc_num=mcs[::-1], batch_size=mcs[::-1], cfg=cfg, seed=3,
                                 max_tokens=max_tokens) == expected[::-1]


def test_stacking_is_really_used(tiny, monkeypatch):
    """The equal-length batches go through fewer forwards (so the equality above tests stacking)."""
    model, _ = tiny
    calls = []
    real = likelihood_module.mask_predictor_logits
    monkeypatch.setattr(likelihood_module, "mask_predictor_logits",
                        lambda m, x, **kw: calls.append(x.shape[0]) or real(m, x, **kw))
    pairs = _synthetic_pairs()[:4]
    mc_loglikelihood_many(model, pairs, mc_num=[4, 4, 4, 1], batch_size=[4, 4, 4, 1])
    assert sorted(calls) == [1, 12]                                 # 3 pairs stacked; 1 x 34 rows alone


def test_weight_activation_model_stacked_equal_pair_by_pair(tiny):
    _, tokenizer = tiny
    lm = load_plain_model("dllmq-tiny")
    quantize(lm.model, lm.tokenizer, QuantConfig("duquant", wbits=4, abits=4, nsamples=4, seqlen=64), progress=False)
    pairs, mcs = _mini_general_pairs(tokenizer, n_items=3)
    assert mc_loglikelihood_many(lm.model, pairs, mc_num=mcs, batch_size=mcs) == _one_by_one(lm.model, pairs, mcs)


def test_dream_family_stacked_equal_pair_by_pair():
    model, _ = random_model("random-dream", seed=0)
    gen = torch.Generator().manual_seed(1)
    pairs = [(torch.randint(0, 200, (20,), generator=gen).tolist(), torch.randint(0, 200, (k,), generator=gen).tolist())
             for k in (4, 4, 2, 4)]
    got = mc_loglikelihood_many(model.eval(), pairs, mc_num=8, batch_size=4)
    assert got == [
        mc_loglikelihood(model, p, a, mc_num=8, batch_size=4) for p, a in pairs]


def test_mismatched_per_pair_settings_are_refused(tiny):
    from dllmq.errors import DllmqError
    with pytest.raises(DllmqError, match="pairs"):
        mc_loglikelihood_many(tiny[0], _synthetic_pairs()[:2], mc_num=[4])
