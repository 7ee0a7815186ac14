"""QuaRot (Ashkboos et al., 2024): rotate the model so no activation has outliers, then quantize.

Before calibration, on the whole model (all exact in full precision):
1. fuse every RMSNorm's weight into the linears that read it (and the final norm into the LM head),
   leaving unit norms — RMSNorm(x Q) = RMSNorm(x) Q for orthogonal Q once its weight is 1;
2. rotate the residual stream by a seeded random Hadamard Q (float64): embedding E Q, readers
   (q/k/v, gate/up, LM head) W Q, writers (attention out, down) Q^T W; tied embeddings are untied;
3. a Hadamard per head on v's outputs and the attention-out inputs (offline, fused);
4. an online Hadamard before the down projection (W_down H offline, x H at run time) — the FFN sizes
   need 12 x 2^k (LLaDA) and 148 x 2^k (Dream) Hadamards, which dllmq builds (hadamard.py).
Then weights by GPTQ or RTN (per channel, symmetric), activations per token (symmetric, clip 0.9 at
4 bits), and with --kv-bits a Hadamard on Q and K after RoPE and K/V quantized per head (asymmetric,
group 128, clip 0.95). The LM head stays in high precision.

Three settings reproduce QuaRot's own code (its fake_quant/ as the study ran it; `--profile paper`
sets them): `signed_grid` (every symmetric grid scaled max / (2^(b-1) - 1), codes -2^(b-1) ..
2^(b-1) - 1), `cross_head` (an online Hadamard across heads before the attention output, so with
step 3 its input sees a full-width Hadamard) and `kv_per_token` (K and V quantized symmetric per
token across all heads, after the Q/K Hadamard).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from dllmq.errors import DllmqError
from dllmq.models.family import Role
from dllmq.models.modeling import Block, TransformerLM
from dllmq.quant.activations import ActQuantizer
from dllmq.quant.block import BlockContext, QuantizedWeight
from dllmq.quant.formats import Format
from dllmq.quant.gptq_solver import GPTQSettings, check_float_format, gptq_block
from dllmq.quant.hadamard import CrossHeadHadamard, HadamardTransform, fast_hadamard, hadamard_matrix, random_hadamard
from dllmq.quant.methods.base import WEIGHT_ACTIVATION, Method
from dllmq.quant.modules import replace_module
from dllmq.quant.online import OnlineLinear
from dllmq.quant.primitives import QuantSpec, fake_quantize
from dllmq.quant.rounding import round_block
from dllmq.quant.specs import setting


def _set(param: nn.Parameter, value: torch.Tensor) -> None:
    param.data = value.to(param.dtype)


def fuse_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    g = norm.weight.detach().double()
    for linear in linears:
        _set(linear.weight, linear.weight.detach().double() * g[None, :])
    _set(norm.weight, torch.ones_like(g))


def untie(model: TransformerLM) -> None:
    if model.config.tie_embeddings:
        head = model.get_lm_head()
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_embeddings = False
        model.config.raw["tie_word_embeddings"] = False


def rotate_model(model: TransformerLM, seed: int = 0, cross_head: bool = False) -> None:
    """Steps 1-4 above (with `cross_head`, also the online Hadamard across heads before the attention
    output), in place; the model computes the same function afterwards."""
    fam, c = model.family, model.config
    untie(model)
    with torch.no_grad():
        Q = random_hadamard(c.hidden_size, seed)
        H_head = hadamard_matrix(c.head_dim).double() / c.head_dim ** 0.5
        H_ffn = hadamard_matrix(c.intermediate_size).double() / c.intermediate_size ** 0.5
        emb = model.get_embedding()
        _set(emb.weight, emb.weight.detach().double() @ Q)
        attn_in, mlp_in = fam.group(Role.ATTN_IN), fam.group(Role.MLP_IN)
        [v] = attn_in.linears[2:]
        [o] = fam.group(Role.ATTN_OUT).linears
        [down] = fam.group(Role.MLP_OUT).linears
        for block in model.get_blocks():
            part = block.get_submodule
            for group in (attn_in, mlp_in):
                fuse_norm(part(group.source), [part(n) for n in group.linears])
            for name in attn_in.linears + mlp_in.linears:  # readers of the residual
                _set(part(name).weight, part(name).weight.detach().double() @ Q)
            for name in fam.residual_writers:
                lin = part(name)
                _set(lin.weight, Q.T @ lin.weight.detach().double())
                if lin.bias is not None:
                    _set(lin.bias, lin.bias.detach().double() @ Q)
            _rotate_heads(part(v), part(o), H_head, c.head_dim)
            if cross_head:
                _mix_heads(block, o, c.n_heads)
            lin = OnlineLinear.wrap(part(down))
            _set(lin.weight, lin.weight.detach().double() @ H_ffn)
            lin.input_transform = HadamardTransform(c.intermediate_size)
            replace_module(block, down, lin)
        head = model.get_lm_head()
        fuse_norm(model.get_final_norm(), [head])
        _set(head.weight, head.weight.detach().double() @ Q)


def _rotate_heads(v: nn.Linear, o: nn.Linear, H: torch.Tensor, d: int) -> None:
    """v's output rows and o's input columns, head by head: v' = v H, o consumes attn H."""
    wv = v.weight.detach().double()
    _set(v.weight, (H.T @ wv.reshape(-1, d, wv.shape[1])).reshape(wv.shape))
    if v.bias is not None:
        _set(v.bias, (v.bias.detach().double().reshape(-1, d) @ H).reshape(-1))
    wo = o.weight.detach().double()
    _set(o.weight, (wo.reshape(wo.shape[0], -1, d) @ H).reshape(wo.shape))


def _mix_heads(block: nn.Module, name: str, heads: int) -> None:
    """The attention output reads x @ T online (T = kron(H_heads, I) / sqrt(heads), CrossHeadHadamard)
    and its weight becomes W T, so the block computes the same function."""
    lin = OnlineLinear.wrap(block.get_submodule(name))
    H = hadamard_matrix(heads).double() / math.sqrt(heads)
    w = lin.weight.detach().double()
    _set(lin.weight, torch.einsum("ohd,hk->okd", w.reshape(w.shape[0], heads, -1), H).reshape(w.shape))
    lin.input_transform = CrossHeadHadamard(heads)
    replace_module(block, name, lin)


class TokenKVQuantizer(nn.Module):
    """QuaRot's K/V quantization as its code runs it, on a block's kv_hook: Q and K times a head-dim
    Hadamard after RoPE (in float32; Q K^T is unchanged and Q stays in full precision), then K and V
    each quantized per token across all their heads, symmetric (QuaRot's `k_quantizer` on K reshaped
    to [tokens, heads * head_dim], and v_proj's output quantizer)."""

    def __init__(self, bits: int, clip_ratio: float = 1.0, signed_grid: bool = True):
        super().__init__()
        self.spec = QuantSpec(bits=bits, symmetric=True, granularity="token", clip_ratio=clip_ratio,
                              signed_grid=signed_grid)

    def _per_token(self, t: torch.Tensor) -> torch.Tensor:   # [B, heads, L, head_dim]
        b, h, length, d = t.shape
        rows = t.transpose(1, 2).reshape(b, length, h * d)
        return fake_quantize(rows, self.spec).reshape(b, length, h, d).transpose(1, 2)

    def forward(self, q, k, v):
        dtype = q.dtype
        q, k = fast_hadamard(q.float()).to(dtype), fast_hadamard(k.float()).to(dtype)
        return q, self._per_token(k), self._per_token(v)

    def extra_repr(self) -> str:
        grid = ", signed grid" if self.spec.signed_grid else ""
        return f"bits={self.spec.bits}, per token across heads, symmetric{grid}, clip={self.spec.clip_ratio}"


@dataclass(frozen=True)
class QuaRotSettings(GPTQSettings):
    weight_method: str = setting("gptq", "how the rotated weights are quantized", flag="--weight-method",
                                 choices=("gptq", "rtn"))
    signed_grid: bool = setting(False, "symmetric grids (weights, activations, K/V) scaled max / (2^(b-1) - 1), "
                                       "codes -2^(b-1)..2^(b-1)-1 (QuaRot's code), instead of 2 max / (2^b - 1)",
                                optional=True)
    cross_head: bool = setting(False, "an online Hadamard across heads before the attention output: with the "
                                      "per-head one, a full-width Hadamard on its input (QuaRot's code)", optional=True)
    kv_per_token: bool = setting(False, "with --kv-bits: K and V quantized symmetric per token across all heads "
                                        "(QuaRot's code) instead of per head in groups, asymmetric", optional=True)

    def check(self) -> None:
        super().check()
        if self.weight_method not in ("gptq", "rtn"):
            raise DllmqError(f"--weight-method must be gptq or rtn, got {self.weight_method!r}.")


class QuaRot(Method):
    name = "quarot"
    display_name = "QuaRot"
    kind = WEIGHT_ACTIVATION
    transform = "rotation"
    Settings = QuaRotSettings
    weight_sym = True
    act_sym = True
    low_bit_act_clip = 0.9
    rotate_qk = True

    @classmethod
    def paper_settings(cls, family: str | None) -> dict:
        # QuaRot/fake_quant (utils.py defaults, scripts/llada_quarot.sh --w_clip): GPTQ with percdamp 0.01,
        # no act-order, and an MSE search over the shrink factors 1, 0.99, ..., 0.21 (grid 100, maxshrink
        # 0.8, norm 2.4 in quant_utils.py) on its signed symmetric grid; activations per token with
        # a_clip_ratio 1.0 (the scripts pass none); an online cross-head Hadamard on attn_out's input
        # (main.py, online_partial_had); K and V at 8 bits (the script's --k_bits 8 --v_bits 8), symmetric
        # per token, clip 1.0 (rotation_utils.QKRotationWrapper, v_proj's out_quantizer); calibration
        # windows of model.seqlen tokens, 4096 on LLaDA (model_utils.py). docs/fidelity.md, item 8.
        settings = dict(weight_method="gptq", damp=0.01, act_order=False, static_groups=False, grid_search=True,
                        grid_points=79, grid_min_shrink=0.21, signed_grid=True, cross_head=True,
                        kv_per_token=True, act_clip=1.0, kv_bits=8, kv_clip=1.0)
        if family == "llada":
            settings["seqlen"] = 4096
        return settings

    @classmethod
    def needs_calibration(cls, settings: QuaRotSettings) -> bool:
        return settings.weight_method == "gptq"

    @classmethod
    def takes_token_weights(cls, settings: QuaRotSettings) -> bool:
        return settings.weight_method == "gptq"   # GPTQ's Hessian takes --weighting's token weights

    @classmethod
    def check_weight_format(cls, settings: QuaRotSettings, fmt: Format) -> None:
        if fmt.is_float and settings.weight_method == "gptq":
            check_float_format(fmt, settings)

    def prepare_model(self, model: TransformerLM) -> None:
        rotate_model(model, seed=self.config.seed, cross_head=self.settings.cross_head)

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        spec = replace(self.config.weight, signed_grid=self.settings.signed_grid)
        if self.settings.weight_method == "gptq":
            return gptq_block(ctx, spec, self.settings)
        return round_block(ctx, spec)

    def build_runtime(self, block: Block) -> None:
        s = self.settings
        if s.cross_head:
            [o] = block.family.group(Role.ATTN_OUT).linears
            linear = block.get_submodule(o)
            if getattr(linear, "input_transform", None) is None:   # a saved model loading: its weights hold W T
                linear.input_transform = CrossHeadHadamard(block.n_heads)
        super().build_runtime(block)
        if not self.config.weight_activation:
            return
        act, kv = self.config.act, self.config.kv
        if s.signed_grid:
            for name in block.family.block_linears:
                block.get_submodule(name).act_quantizer = ActQuantizer(
                    act.bits, symmetric=act.sym, clip_ratio=act.clip, format=act.format, signed_grid=True)
        if kv.enabled and s.kv_per_token:
            block.kv_hook = TokenKVQuantizer(kv.bits, kv.clip, signed_grid=s.signed_grid)

    def input_transform(self, role: Role, in_features: int) -> nn.Module | None:
        return HadamardTransform(in_features) if role == Role.MLP_OUT else None
