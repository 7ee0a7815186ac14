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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dllmq.errors import DllmqError
from dllmq.models.family import Role
from dllmq.models.modeling import TransformerLM
from dllmq.quant.block import BlockContext, QuantizedWeight
from dllmq.quant.formats import Format
from dllmq.quant.gptq_solver import GPTQSettings, check_float_format, gptq_block
from dllmq.quant.hadamard import HadamardTransform, hadamard_matrix, random_hadamard
from dllmq.quant.methods.base import WEIGHT_ACTIVATION, Method
from dllmq.quant.modules import replace_module
from dllmq.quant.online import OnlineLinear
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


def rotate_model(model: TransformerLM, seed: int = 0) -> None:
    """Steps 1-4 above, in place; the model computes the same function afterwards."""
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


@dataclass(frozen=True)
class QuaRotSettings(GPTQSettings):
    weight_method: str = setting("gptq", "how the rotated weights are quantized", flag="--weight-method",
                                 choices=("gptq", "rtn"))

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
        # 0.8, norm 2.4 in quant_utils.py); calibration windows of model.seqlen tokens, 4096 on LLaDA
        # (model_utils.py). Its symmetric grid (max / (2^(b-1) - 1)) and K/V settings are not reproduced
        # yet (docs/fidelity.md, item 8).
        settings = dict(weight_method="gptq", damp=0.01, act_order=False, static_groups=False, grid_search=True,
                        grid_points=79, grid_min_shrink=0.21)
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
        rotate_model(model, seed=self.config.seed)

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        if self.settings.weight_method == "gptq":
            return gptq_block(ctx, self.config.weight, self.settings)
        return round_block(ctx, self.config.weight)

    def input_transform(self, role: Role, in_features: int) -> nn.Module | None:
        return HadamardTransform(in_features) if role == Role.MLP_OUT else None
