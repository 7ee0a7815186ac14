"""Building blocks shared by every family: RMSNorm, RoPE, attention, the SwiGLU block, the model.

Families differ only in submodule names (which must match the official checkpoint keys), biases,
GQA and whether attention is causal. Subclasses build the module tree; the forward passes here
reach submodules through the family description, so quantization can swap any linear in place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dllmq.errors import DllmqError
from dllmq.models.config import ModelConfig
from dllmq.models.family import Family, Role


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in (at least) float32, scale in the input dtype: what LLaDA, Qwen2 and Llama all do.
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin of shape [B, 1, L, head_dim] for the half-split ("rotate_half") RoPE layout.

    Computed in float32 whatever the model dtype (LLaDA's rope_full_precision).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention_bias(attention_mask: torch.Tensor | None, length: int, causal: bool, device) -> torch.Tensor | None:
    """Boolean [B or 1, 1, L, L] mask (True = may attend), or None when every position sees every other."""
    mask = None
    if attention_mask is not None:
        mask = attention_mask.bool()[:, None, None, :]
    if causal:
        tri = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
        mask = tri if mask is None else mask & tri
    return mask


class Block(nn.Module):
    """A pre-norm SwiGLU transformer block. Subclasses create the submodules under official names.

    `kv_hook`, when set, sees (q, k, v) after RoPE with shape [B, heads, L, head_dim]: the place
    where online Q/K rotations and K/V quantizers attach without subclassing the model.
    `kv_cache`, set only during cached generation (dllmq.diffusion.kv_cache), then sees K and V
    (after the hook, before GQA repeats them) and returns the whole sequence's K and V.
    """

    family: Family

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.kv_hook: nn.Module | None = None
        self.kv_cache = None

    def _part(self, name: str) -> nn.Module:
        return self.get_submodule(name)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        return self.mlp_residual(self.attention_residual(x, rope, mask))

    def attention_residual(self, x: torch.Tensor, rope, mask) -> torch.Tensor:
        """The first half of the block: x + attention(norm(x))."""
        return x + self.attention(self._part(self.family.attn_norm)(x), rope, mask)

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        """The second half: x + MLP(norm(x))."""
        return x + self.feed_forward(self._part(self.family.ffn_norm)(x))

    def attention(self, h: torch.Tensor, rope, mask) -> torch.Tensor:
        """Normed input -> attention output after the out projection (AWQ scores its q/k/v scales on this)."""
        q, k, v = (self._part(name)(h) for name in self.family.group(Role.ATTN_IN).linears)
        [out] = self.family.group(Role.ATTN_OUT).linears
        return self._part(out)(self._attend(q, k, v, rope, mask))

    def residual_from_heads(self, x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """attention_residual(x) given what the out projection reads (the heads' outputs, concatenated)."""
        [out] = self.family.group(Role.ATTN_OUT).linears
        return x + self._part(out)(heads)

    def residual_from_mlp(self, x: torch.Tensor, down_input: torch.Tensor) -> torch.Tensor:
        """mlp_residual(x) given what the down projection reads (silu(gate) * up of norm(x))."""
        [down] = self.family.group(Role.MLP_OUT).linears
        return x + self._part(down)(down_input)

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        """Normed input -> SwiGLU output after the down projection."""
        gate, up = (self._part(name)(h) for name in self.family.group(Role.MLP_IN).linears)
        [down] = self.family.group(Role.MLP_OUT).linears
        return self._part(down)(F.silu(gate) * up)

    def _attend(self, q, k, v, rope, mask):
        b, length, _ = q.shape
        q = q.view(b, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_hook is not None:
            q, k, v = self.kv_hook(q, k, v)
        if self.kv_cache is not None:
            k, v = self.kv_cache(k, v)
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return y.transpose(1, 2).reshape(b, length, self.n_heads * self.head_dim)


class TransformerLM(nn.Module):
    """The whole model: embedding -> blocks -> final norm -> LM head, located through the family.

    `forward` returns the raw logits [B, L, V]. For Dream those predict the next position; the
    diffusion layer realigns them (family.shift_logits).
    """

    family: Family

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    # Parts, by the family's paths -------------------------------------------------------------
    def get_embedding(self) -> nn.Embedding:
        return self.get_submodule(self.family.embed)

    def get_blocks(self) -> nn.ModuleList:
        return self.get_submodule(self.family.blocks)

    def get_final_norm(self) -> nn.Module:
        return self.get_submodule(self.family.final_norm)

    def get_lm_head(self) -> nn.Module:
        return self.get_submodule(self.family.lm_head)

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.get_lm_head().weight = self.get_embedding().weight

    # Forward, in pieces the calibration pipeline can call one at a time -----------------------
    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_tables(positions, self.config.head_dim, self.config.rope_theta, dtype)

    def block_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None):
        """Hidden states entering block 0, plus the (rope, mask) every block is called with."""
        b, length = input_ids.shape
        if length > self.config.max_seq_len:
            raise DllmqError(f"The input has {length} tokens but the model's context is {self.config.max_seq_len}.")
        hidden = self.get_embedding()(input_ids)
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device)[None].expand(b, length)
        rope = self.rope(position_ids, hidden.dtype)
        mask = attention_bias(attention_mask, length, self.family.causal, input_ids.device)
        return hidden, rope, mask

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.get_lm_head()(self.get_final_norm()(hidden))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden, rope, mask = self.block_inputs(input_ids, attention_mask, position_ids)
        for block in self.get_blocks():
            hidden = block(hidden, rope, mask)
        return self.head(hidden)


def linear(n_in: int, n_out: int, bias: bool = False) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=bias)


def init_weights(model: TransformerLM, std: float = 0.02, seed: int = 0) -> None:
    """Seeded normal init for random models (real checkpoints overwrite every tensor)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * std)
            elif param.dim() == 1:  # norm weights: near one, not exactly, so folding them is tested
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
