"""An opt-in, approximate key/value cache for LLaDA's block-wise generation (Fast-dLLM, arXiv 2505.22618).

Exact decoding runs the whole sequence through the model at every step. With a cache, the first
step of each block is such a full forward (its logits are used as usual) that also records every
layer's K and V; the block's later steps run only part of the sequence and read the rest from the
record:

- "prefix": recompute the current block and everything after it; the prompt and the finished
  blocks come from the cache.
- "dual": recompute the current block only; the prompt, the finished blocks and the still-masked
  later blocks all come from the cache.

It is approximate: attention is bidirectional, so the cached K/V of the other positions would have
changed once the block's tokens were revealed; they are stale until the next block's full forward
refreshes them. Never the default and never used by the study (docs/evaluation.md has its measured
speed-up and accuracy / flip cost). Every per-token quantizer (activations, the K/V quantizer on
`kv_hook`) still applies to what is recomputed: the cache sits after `kv_hook` in the attention.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dllmq.diffusion.logits import mask_predictor_logits
from dllmq.errors import DllmqError

KV_CACHE_MODES = ("none", "prefix", "dual")


def check_kv_cache(kv_cache: str) -> None:
    if kv_cache not in KV_CACHE_MODES:
        raise DllmqError(f"Unknown kv_cache {kv_cache!r}; use one of {', '.join(KV_CACHE_MODES)}.")


class LayerKV:
    """One attention layer's K/V record, installed as `Block.kv_cache` during a BlockKVCache forward.

    Recording (`start` None) keeps K, V [B, kv_heads, L, head_dim] of a full forward. Reading
    (`start` set) receives K, V of positions start.. start + n only, writes them over the record and
    returns the whole record, so attention sees fresh K/V for what was recomputed, cached for the rest.
    """

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.start: int | None = None

    def __call__(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.start is None:
            self.k, self.v = k, v
            return k, v
        stop = self.start + k.shape[2]
        self.k[:, :, self.start:stop] = k
        self.v[:, :, self.start:stop] = v
        return self.k, self.v


class BlockKVCache:
    """The cache of one generation call. `attention_mask` / `position_ids` / `cfg` / `prompt_mask`
    are the sampler's, for the whole sequence [B, L]. The records sit on the model's blocks only
    during `logits`, so the model is never left changed between steps.
    """

    def __init__(self, model: torch.nn.Module, mode: str, attention_mask: Tensor | None,
                 position_ids: Tensor | None, *, cfg: float = 0.0, prompt_mask: Tensor | None = None):
        check_kv_cache(mode)
        if mode == "none":
            raise DllmqError("BlockKVCache needs kv_cache prefix or dual; none decodes exactly without it.")
        blocks = model.get_blocks() if hasattr(model, "get_blocks") else None
        if blocks is None or not all(hasattr(b, "kv_cache") for b in blocks):
            raise DllmqError("kv_cache needs one of dllmq's own models (LLaDA family); this model has no "
                             "attention blocks that can hold a cache.")
        if model.family.shift_logits:
            raise DllmqError("kv_cache works with LLaDA-style models only; a shifted-logits model (Dream) reads "
                             "token i at position i-1, outside the recomputed block.")
        self.model, self.mode, self.blocks = model, mode, list(blocks)
        self.attention_mask, self.position_ids = attention_mask, position_ids
        self.cfg, self.prompt_mask = cfg, prompt_mask
        self.layers = [LayerKV() for _ in self.blocks]

    def _forward(self, x: Tensor, attention_mask, position_ids, prompt_mask, start: int | None) -> Tensor:
        """One forward with the layers' records on the blocks (start None: record, else read)."""
        for block, layer in zip(self.blocks, self.layers):
            layer.start = start
            block.kv_cache = layer
        try:
            return mask_predictor_logits(self.model, x, attention_mask, position_ids, cfg=self.cfg,
                                         prompt_mask=prompt_mask)
        finally:  # the model is left as it was: a later plain forward is exact
            for block in self.blocks:
                block.kv_cache = None

    def logits(self, x: Tensor, start: int, stop: int, refresh: bool) -> Tensor:
        """Logits [B, stop - start, V] of the current block [start, stop) of x [B, L].

        `refresh`: a full forward that also records every position's K/V (exact logits); otherwise
        the recomputed span runs against the last record (approximate).
        """
        if refresh:
            full = self._forward(x, self.attention_mask, self.position_ids, self.prompt_mask, None)
            return full[:, start:stop]
        if self.layers[0].k is None:
            raise DllmqError("The KV cache has no record yet; refresh it (a full forward) before a cached step.")
        span = slice(start, x.shape[1] if self.mode == "prefix" else stop)
        batch, length = x.shape
        if self.position_ids is None:
            positions = torch.arange(span.start, span.stop, device=x.device).expand(batch, -1)
        else:
            positions = self.position_ids[:, span]
        prompt_mask = None
        if self.prompt_mask is not None:
            prompt_mask = self.prompt_mask.expand(batch, length)[:, span]
        # the attention mask stays whole: the queries are the span, the keys the whole sequence
        part = self._forward(x[:, span], self.attention_mask, positions, prompt_mask, start)
        return part[:, : stop - start]
