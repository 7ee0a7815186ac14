"""Perplexity: exact for causal models, the Monte Carlo ELBO bound for diffusion models."""
from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _toy import MASK, VOCAB, ToyModel  # noqa: E402

from dllmq.diffusion import (  # noqa: E402
    PerplexityResult,
    causal_perplexity,
    diffusion_perplexity,
    mask_predictor_logits,
    perplexity,
)
from dllmq.errors import DllmqError  # noqa: E402

TEXT = torch.randint(0, 40, (70,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def models():
    return {kind: ToyModel(kind) for kind in ("llada", "dream", "causal")}


def test_causal_perplexity_equals_hand_computed(models):
    model = models["causal"]
    seqlen = 16
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(70 // seqlen):
            window = TEXT[w * seqlen : (w + 1) * seqlen]
            for i in range(1, seqlen):  # each token from its prefix alone
                logp = model(window[None, :i])[0, -1].float().log_softmax(-1)
                nll -= float(logp[window[i]])
                count += 1
    result = causal_perplexity(model, TEXT, seqlen=seqlen, batch_size=3, progress=False)
    assert isinstance(result, PerplexityResult)
    assert (result.n_windows, result.n_tokens, result.is_bound) == (4, count, False)
    assert result.nll == pytest.approx(nll / count, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert perplexity(model, TEXT, seqlen=seqlen, progress=False) == result


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_uniform_model_bound_is_vocab_size(kind):
    model = ToyModel(kind, uniform=True)
    result = diffusion_perplexity(model, TEXT, seqlen=16, mc_num=6, batch_size=4, progress=False)
    assert result.ppl == pytest.approx(VOCAB, rel=1e-4)
    assert result.is_bound


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_diffusion_bound_deterministic_and_counts(models, kind):
    model = models[kind]
    kw = dict(seqlen=16, mc_num=8, batch_size=4, progress=False)
    a = diffusion_perplexity(model, TEXT, seed=1, **kw)
    assert a == diffusion_perplexity(model, TEXT, seed=1, **kw)
    assert a.nll != diffusion_perplexity(model, TEXT, seed=2, **kw).nll
    assert math.isfinite(a.ppl) and a.ppl > 1
    scored = 15 if kind == "dream" else 16  # Dream cannot predict a window's first token
    assert (a.n_windows, a.n_tokens) == (4, 4 * scored)
    assert perplexity(model, TEXT, seed=1, **kw) == a


@torch.no_grad()
def enumerated_bound(model, window):
    """Per-token ELBO: E_k E_{|S|=k} [(n/k) * CE summed over S] / n, k uniform on 1..n."""
    n = len(window)
    total = 0.0
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), k))
        for subset in subsets:
            x = window.clone()[None]
            x[0, list(subset)] = MASK
            logp = mask_predictor_logits(model, x)[0].float().log_softmax(-1)
            ce = -sum(float(logp[i, window[i]]) for i in subset)
            total += (1 / n) * (n / k) * ce / len(subsets)
    return total / n


def test_diffusion_bound_converges_to_enumerated_elbo(models):
    model = models["llada"]
    window = TEXT[:4]
    want = enumerated_bound(model, window)
    got = diffusion_perplexity(model, window, seqlen=4, mc_num=2000, batch_size=500, progress=False)
    assert got.nll == pytest.approx(want, rel=0.02)


def test_windows_and_errors(models):
    model = models["llada"]
    r = diffusion_perplexity(model, TEXT, seqlen=16, mc_num=2, batch_size=2, max_windows=2, progress=False)
    assert r.n_windows == 2
    with pytest.raises(DllmqError, match="fewer than one window"):
        diffusion_perplexity(model, TEXT[:10], seqlen=16, progress=False)
    with pytest.raises(DllmqError, match="fewer than one window"):
        causal_perplexity(models["causal"], TEXT[:10], seqlen=16, progress=False)
    with pytest.raises(DllmqError, match="max_seq_len"):
        diffusion_perplexity(model, torch.zeros(300, dtype=torch.long), seqlen=256, progress=False)
    with pytest.raises(DllmqError, match="seqlen must be at least 2"):
        diffusion_perplexity(model, TEXT, seqlen=1, progress=False)
    with pytest.raises(DllmqError, match="causal"):
        diffusion_perplexity(models["causal"], TEXT, seqlen=16, progress=False)
    with pytest.raises(DllmqError, match="causal model"):
        causal_perplexity(model, TEXT, seqlen=16, progress=False)
