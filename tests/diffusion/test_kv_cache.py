"""The opt-in approximate KV cache of LLaDA generation (dllmq.diffusion.kv_cache)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _toy import ToyModel  # noqa: E402

from dllmq.diffusion import generate, llada_generate, mask_predictor_logits  # noqa: E402
from dllmq.diffusion.kv_cache import BlockKVCache  # noqa: E402
from dllmq.diffusion.logits import positions_from_mask  # noqa: E402
from dllmq.errors import DllmqError  # noqa: E402
from dllmq.models.modeling import init_weights  # noqa: E402
from dllmq.models.random_models import random_model  # noqa: E402
from dllmq.quant.api import quantize  # noqa: E402
from dllmq.quant.config import QuantConfig  # noqa: E402

MODES = ("prefix", "dual")


def llada(layers: int = 2, seed: int = 0, std: float = 0.3):
    """A random LLaDA with weights large enough that its predictions are far from uniform (no near-ties)."""
    model, tok = random_model("random-llada", seed=seed, n_layers=layers)
    init_weights(model, std=std, seed=seed)
    model.tie_weights()
    return model.eval(), tok


def w8a8(model, tok):
    """RTN W8A8 with 8-bit K/V: per-token activation quantizers on every linear and a KVQuantizer kv_hook."""
    quantize(model, tok, QuantConfig(method="rtn", wbits=8, abits=8, kv_bits=8, kv_group_size=32), progress=False)
    assert all(b.kv_hook is not None for b in model.get_blocks())
    return model


def padded_batch(model, n_prompt: int = 7, seed: int = 0):
    """Two prompt rows, the second left-padded by 3, and its mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, model.config.vocab_size - 64, (2, n_prompt), generator=gen)
    mask = torch.ones_like(ids, dtype=torch.bool)
    ids[1, :3] = model.config.pad_token_id
    mask[1, :3] = False
    return ids, mask


SETTINGS = dict(gen_length=12, steps=12, block_length=4)


@pytest.fixture(scope="module")
def model2():
    return llada(layers=2)


# ---------------------------------------------------------------- exact where it must be


def test_none_is_the_exact_path(model2):
    model, _ = model2
    ids, mask = padded_batch(model)
    today = llada_generate(model, ids, attention_mask=mask, **SETTINGS)
    assert torch.equal(llada_generate(model, ids, attention_mask=mask, kv_cache="none", **SETTINGS), today)
    assert torch.equal(generate(model, None, ids, attention_mask=mask, kv_cache="none", **SETTINGS), today)


@pytest.mark.parametrize("mode", MODES)
def test_a_refresh_at_every_step_is_exact(model2, mode):
    """One step per block: every step is a block's first, a full forward that refreshes the cache."""
    model, _ = model2
    ids, mask = padded_batch(model)
    for kw in (dict(gen_length=12, steps=3, block_length=4), dict(gen_length=8, steps=1, block_length=8)):
        exact = llada_generate(model, ids, attention_mask=mask, **kw)
        assert torch.equal(llada_generate(model, ids, attention_mask=mask, kv_cache=mode, **kw), exact)


def _state_mid_block(model, ids, mask):
    """x after 2 exact steps (inside the second block of 4), and the block's span."""
    states = []
    llada_generate(model, ids, attention_mask=mask, callback=lambda s, x: states.append(x), **SETTINGS)
    start = ids.shape[1] + 4
    return states[5], start, start + 4


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_cached_step_on_a_fresh_record_matches_the_full_forward(model2, mode, cfg):
    """Right after a refresh nothing is stale, so the recomputed span's logits equal the full forward's."""
    model, _ = model2
    ids, mask = padded_batch(model)
    x, start, stop = _state_mid_block(model, ids, mask)
    full_mask, positions = positions_from_mask(torch.cat([mask, torch.ones(2, 12, dtype=torch.bool)], 1))
    prompt_mask = (torch.arange(x.shape[1]) < ids.shape[1]) & full_mask
    full = mask_predictor_logits(model, x, full_mask, positions, cfg=cfg, prompt_mask=prompt_mask)
    cache = BlockKVCache(model, mode, full_mask, positions, cfg=cfg, prompt_mask=prompt_mask)
    assert torch.equal(cache.logits(x, start, stop, refresh=True), full[:, start:stop])
    cached = cache.logits(x, start, stop, refresh=False)
    assert cached.shape == (2, 4, model.config.vocab_size)
    torch.testing.assert_close(cached, full[:, start:stop], atol=1e-4, rtol=1e-4)
    assert all(b.kv_cache is None for b in model.get_blocks())  # the model is left as it was


class Capture(nn.Module):
    """A kv_hook that runs the model's own hook (if any) and keeps what it returns."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, q, k, v):
        if self.inner is not None:
            q, k, v = self.inner(q, k, v)
        self.seen.append((k.clone(), v.clone()))
        return q, k, v


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("quantized", [False, True])
def test_record_holds_the_full_forwards_kv_and_recomputes_through_kv_hook(mode, quantized):
    model, tok = llada(layers=2, seed=1)
    if quantized:
        w8a8(model, tok)
    ids, mask = padded_batch(model)
    x, start, stop = _state_mid_block(model, ids, mask)
    full_mask, positions = positions_from_mask(torch.cat([mask, torch.ones(2, 12, dtype=torch.bool)], 1))
    blocks = model.get_blocks()
    hooks = [Capture(b.kv_hook) for b in blocks]
    originals = [b.kv_hook for b in blocks]
    try:
        for b, h in zip(blocks, hooks):
            b.kv_hook = h
        mask_predictor_logits(model, x, full_mask, positions)  # a plain full forward
        plain = [h.seen.pop() for h in hooks]
        cache = BlockKVCache(model, mode, full_mask, positions)
        cache.logits(x, start, stop, refresh=True)
        for layer, (k, v) in zip(cache.layers, plain):
            assert torch.equal(layer.k, k) and torch.equal(layer.v, v)
        recorded = [(layer.k.clone(), layer.v.clone()) for layer in cache.layers]
        x2 = x.clone()
        x2[:, start] = 42  # the block changes: its K/V must be recomputed, the rest read from the record
        cache.logits(x2, start, stop, refresh=False)
        stop_rec = x.shape[1] if mode == "prefix" else stop
        for layer, hook, (k0, v0) in zip(cache.layers, hooks, recorded):
            k_new, v_new = hook.seen.pop()  # the hook (K/V quantizer) saw the recomputed span only
            assert k_new.shape[2] == stop_rec - start
            span = slice(start, stop_rec)
            assert torch.equal(layer.k[:, :, span], k_new) and torch.equal(layer.v[:, :, span], v_new)
            assert not torch.equal(k_new, k0[:, :, start:stop_rec])
            for t, t0 in ((layer.k, k0), (layer.v, v0)):
                assert torch.equal(t[:, :, :start], t0[:, :, :start])
                assert torch.equal(t[:, :, stop_rec:], t0[:, :, stop_rec:])
    finally:
        for b, h in zip(blocks, originals):
            b.kv_hook = h


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("quantized", [False, True])
def test_one_layer_model_decodes_exactly_with_the_cache(mode, quantized):
    """With one layer, K/V depend on a position's own token only, so cached K/V of unchanged positions are
    never stale: cached decoding must reproduce exact decoding token for token (padding, positions, the
    per-token activation and K/V quantizers all included)."""
    model, tok = llada(layers=1, seed=2)
    if quantized:
        w8a8(model, tok)
    ids, mask = padded_batch(model, seed=3)
    exact = llada_generate(model, ids, attention_mask=mask, **SETTINGS)
    assert torch.equal(llada_generate(model, ids, attention_mask=mask, kv_cache=mode, **SETTINGS), exact)
    exact = llada_generate(model, ids, attention_mask=mask, cfg=1.0, **SETTINGS)
    assert torch.equal(llada_generate(model, ids, attention_mask=mask, cfg=1.0, kv_cache=mode, **SETTINGS), exact)


@pytest.mark.parametrize("mode", MODES)
def test_cached_left_padding_matches_unpadded(model2, mode):
    model, _ = model2
    ids, mask = padded_batch(model)
    together = llada_generate(model, ids, attention_mask=mask, kv_cache=mode, **SETTINGS)
    alone = llada_generate(model, ids[1:, 3:], kv_cache=mode, **SETTINGS)
    assert torch.equal(together[1, 3:], alone[0])
    assert torch.equal(together[0], llada_generate(model, ids[:1], kv_cache=mode, **SETTINGS)[0])


@pytest.mark.parametrize("mode, lengths", [("prefix", [19, 12, 12, 12, 19, 8, 8, 8, 19, 4, 4, 4]),
                                           ("dual", [19, 4, 4, 4] * 3)])
def test_cache_recomputes_only_its_span(model2, mode, lengths):
    """Per block: one full forward, then prefix runs the block and all after it, dual the block alone."""
    model, _ = model2
    ids, mask = padded_batch(model)
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    try:
        llada_generate(model, ids, attention_mask=mask, kv_cache=mode, **SETTINGS)
    finally:
        handle.remove()
    assert seen == lengths
    assert all(b.kv_cache is None for b in model.get_blocks())  # nothing left on the model afterwards


def test_refusals(model2):
    model, _ = model2
    ids, _ = padded_batch(model)
    with pytest.raises(DllmqError, match="Unknown kv_cache 'full'"):
        llada_generate(model, ids, kv_cache="full", **SETTINGS)
    dream, _ = random_model("random-dream", seed=0)
    with pytest.raises(DllmqError, match="needs LLaDA's block-wise sampler"):
        generate(dream, None, ids, kv_cache="dual", gen_length=8, steps=8)
    with pytest.raises(DllmqError, match="shifted-logits"):
        llada_generate(dream, ids, kv_cache="dual", **SETTINGS)
    with pytest.raises(DllmqError, match="dllmq's own models"):
        llada_generate(ToyModel("llada"), ids % 40, kv_cache="prefix", **SETTINGS)


@pytest.mark.parametrize("ev", [{"kv_cache": "dual"}, {"harness": {"kv_cache": "prefix"}}])
def test_the_study_refuses_the_cache(ev):
    from dllmq.study.config import parse_study_config
    data = {"models": ["random-llada"], "methods": ["fp"], "tasks": ["mini_math"], "eval": ev}
    with pytest.raises(DllmqError, match="kv_cache is refused: the study always decodes exactly"):
        parse_study_config(data)
    del data["eval"]
    parse_study_config(data)  # the same config without it is fine
