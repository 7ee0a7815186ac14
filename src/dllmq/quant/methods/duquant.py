"""DuQuant (Lin et al., 2024): smooth, rotate block-wise, permute, rotate again — then quantize.

For each group of linears reading one input, from its calibration activations X:
1. smoothing s = max|X|^alpha / max|W|^(1-alpha) (alpha 0.6);
2. a block-diagonal rotation R1 (blocks of 128 channels), each block built greedily: take the
   channel with the largest |activation|, swap it to the front and spread it evenly with a Hadamard
   (every entry of a Hadamard row has the same magnitude); repeat while the block's max falls, up to
   256 steps;
3. a zigzag permutation P that deals channels, by decreasing max, to the blocks in a back-and-forth
   order so every block gets a similar share of large channels;
4. a second greedy block rotation R2 on the permuted activations.
The transform T = diag(1/s) R1 P R2 runs online on the activations and its inverse side is folded
into the weights, W' = (W diag(s)) R1 P R2 (R orthogonal, P a permutation), so the full-precision
model is unchanged. Then weights are rounded per channel (clip 0.8 at 4 bits) and activations
quantized per token (asymmetric, clip 0.9 at 4 bits), the study's settings.

With `rotation="study"` (the paper profile, docs/fidelity.md item 7) the study code's own construction runs
instead: its smoothing folds, one Givens-based rotation shared by all blocks of a linear's input
(dllmq.quant.duquant_rotation), fitted group by group on the mean calibration window as the already
quantized layers transform it; with `study_grid` (also set by the paper profile) weights and activations
go on the study's asymmetric grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dllmq.errors import DllmqError
from dllmq.models.family import Role
from dllmq.quant.activations import ActQuantizer, QKVQuantizer
from dllmq.quant.block import BlockContext, QuantizedWeight
from dllmq.quant.duquant_rotation import fit_rotation
from dllmq.quant.hadamard import hadamard_matrix
from dllmq.quant.methods.base import WEIGHT_ACTIVATION, Method
from dllmq.quant.modules import replace_module
from dllmq.quant.online import OnlineLinear
from dllmq.quant.rounding import round_block, rtn_weight
from dllmq.quant.smoothing import (ALPHA_HELP, can_fold, channel_absmax, check_alpha, fold_scales, group_scales,
                                   smoothing_scales)
from dllmq.quant.specs import STUDY_GRID_HELP, MethodSettings, setting
from dllmq.quant.tokens import sample_tokens

MAX_TOKENS = 2048  # calibration tokens the greedy rotations look at
ROTATIONS = ("greedy", "study")
STUDY_SCALE_FLOOR = 0.01   # truncate_number(smooth_scale, 1e-2) in the study's smooth_and_let_inplace


def block_sizes(n: int, block: int) -> list[int]:
    return [block] * (n // block) + ([n % block] if n % block else [])


def greedy_rotation(x: torch.Tensor, steps: int) -> torch.Tensor:
    """An orthogonal [b, b] matrix R that lowers max |x R| (x: [tokens, b], float64)."""
    b = x.shape[1]
    H = hadamard_matrix(b).to(x) / math.sqrt(b)
    R = torch.eye(b, dtype=x.dtype)
    best = x.abs().max()
    for _ in range(steps):
        channel = int((x @ R).abs().amax(0).argmax())
        swap = torch.arange(b)
        swap[0], swap[channel] = channel, 0
        candidate = R[:, swap] @ H  # bring the worst channel to the front, spread it over all
        peak = (x @ candidate).abs().max()
        if peak >= best:
            break
        R, best = candidate, peak
    return R


def zigzag_permutation(channel_max: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Channels dealt by decreasing max to blocks 0..K-1, K-1..0, 0..K-1, ... (full blocks skipped)."""
    order = torch.argsort(channel_max, descending=True).tolist()
    k = len(sizes)
    members: list[list[int]] = [[] for _ in range(k)]
    sweep = list(range(k)) + list(range(k - 1, -1, -1))
    i = 0
    for ch in order:
        while len(members[sweep[i % len(sweep)]]) >= sizes[sweep[i % len(sweep)]]:
            i += 1
        members[sweep[i % len(sweep)]].append(ch)
        i += 1
    return torch.tensor([ch for m in members for ch in m], dtype=torch.long)


class DuQuantTransform(nn.Module):
    """x -> (x / s) R1 P R2 with block-diagonal R1, R2; buffers so saved models keep it."""

    def __init__(self, n: int, block: int):
        super().__init__()
        self.n, self.block = n, block
        sizes = block_sizes(n, block)
        self.register_buffer("inv_smooth", torch.ones(n))
        self.register_buffer("perm", torch.arange(n))
        for tag in ("r1", "r2"):
            for i, b in enumerate(sizes):
                self.register_buffer(f"{tag}_{i}", torch.eye(b))

    def _blocks(self, tag: str) -> list[torch.Tensor]:
        return [getattr(self, f"{tag}_{i}") for i in range(len(block_sizes(self.n, self.block)))]

    def _rotate(self, x: torch.Tensor, tag: str) -> torch.Tensor:
        """x @ blockdiag(R_0, R_1, ...): the full blocks in one batched matmul, a short last block apart."""
        blocks = self._blocks(tag)
        full = [r for r in blocks if r.shape[0] == self.block]
        if not full:  # n smaller than one block
            return x @ blocks[0].to(x.dtype)
        k, b = len(full), self.block
        lead = x.shape[:-1]
        xs = x[..., :k * b].reshape(-1, k, b).transpose(0, 1)                  # [k, tokens, b]
        out = torch.bmm(xs, self._stacked(tag, full, x.dtype)).transpose(0, 1).reshape(*lead, k * b)
        if len(full) == len(blocks):
            return out
        return torch.cat([out, x[..., k * b:] @ blocks[-1].to(x.dtype)], dim=-1)

    def _stacked(self, tag: str, full: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """torch.stack(full).to(dtype), built once and reused while the blocks are unchanged."""
        key = (dtype, tuple((r.data_ptr(), r._version) for r in full))
        cache = self.__dict__.setdefault("_stack_cache", {})
        if tag not in cache or cache[tag][0] != key:
            cache[tag] = (key, torch.stack(full).to(dtype))
        return cache[tag][1]

    def _apply(self, fn, recurse=True):
        # rotations stay at least float32 when the model is cast to a 16-bit dtype
        self.__dict__.pop("_stack_cache", None)
        super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is not None and buf.dtype in (torch.float16, torch.bfloat16):
                self._buffers[name] = buf.float()
        return self

    def orthogonal(self, x: torch.Tensor) -> torch.Tensor:
        return self._rotate(self._rotate(x, "r1").index_select(-1, self.perm), "r2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return self.orthogonal(x * self.inv_smooth.to(x.dtype)).to(dtype)

    @classmethod
    def fit(cls, x: torch.Tensor, s: torch.Tensor, block: int, steps: int) -> "DuQuantTransform":
        """Build from smoothed calibration activations x / s ([tokens, n])."""
        n = x.shape[1]
        t = cls(n, block)
        xs = (x.double() / s.double())
        sizes = block_sizes(n, block)
        with torch.no_grad():
            t.inv_smooth.copy_((1 / s).float())
            r1 = cls._fit_blocks(xs, sizes, steps)
            for i, r in enumerate(r1):
                getattr(t, f"r1_{i}").copy_(r)
            x1 = torch.cat([xs[:, a:a + b] @ r for a, b, r in zip(_starts(sizes), sizes, r1)], dim=1)
            perm = zigzag_permutation(x1.abs().amax(0), sizes)
            t.perm.copy_(perm)
            r2 = cls._fit_blocks(x1[:, perm], sizes, steps)
            for i, r in enumerate(r2):
                getattr(t, f"r2_{i}").copy_(r)
        return t

    @classmethod
    def from_parts(cls, inv_smooth: torch.Tensor, block: int, r1: list[torch.Tensor], perm: torch.Tensor,
                   r2: list[torch.Tensor]) -> "DuQuantTransform":
        """A transform from its fitted pieces (one rotation per block of channels, each side)."""
        t = cls(inv_smooth.numel(), block)
        with torch.no_grad():
            t.inv_smooth.copy_(inv_smooth.float())
            t.perm.copy_(perm)
            for tag, blocks in (("r1", r1), ("r2", r2)):
                for i, r in enumerate(blocks):
                    getattr(t, f"{tag}_{i}").copy_(r)
        return t

    @classmethod
    def fit_study(cls, x: torch.Tensor, inv_smooth: torch.Tensor, block: int, steps: int,
                  generator: torch.Generator) -> "DuQuantTransform":
        """The study's construction (dllmq.quant.duquant_rotation) on x ([tokens, n], before the 1/s):
        one rotation shared by the full blocks, the zigzag permutation, a second shared rotation. A
        last block shorter than `block` (the study's code refuses such widths) gets its own of its order."""
        xs = x.double() * inv_smooth.double().to(x.device)
        sizes = block_sizes(xs.shape[1], block)
        r1 = _shared_rotations(xs, sizes, block, steps, generator)
        x1 = torch.cat([xs[:, a:a + b] @ r for a, b, r in zip(_starts(sizes), sizes, r1)], dim=1)
        perm = zigzag_permutation(x1.abs().amax(0), sizes)
        r2 = _shared_rotations(x1[:, perm], sizes, block, steps, generator)
        return cls.from_parts(inv_smooth, block, r1, perm, r2)

    @staticmethod
    def _fit_blocks(x: torch.Tensor, sizes: list[int], steps: int) -> list[torch.Tensor]:
        return [greedy_rotation(x[:, a:a + b], steps) for a, b in zip(_starts(sizes), sizes)]

    def extra_repr(self) -> str:
        return f"n={self.n}, block={self.block}"


def _shared_rotations(x: torch.Tensor, sizes: list[int], block: int, steps: int,
                      generator: torch.Generator) -> list[torch.Tensor]:
    full = sum(b for b in sizes if b == block)
    shared = fit_rotation(x[:, :full], block, steps, generator) if full else None
    rest = [fit_rotation(x[:, full:], x.shape[1] - full, steps, generator)] if x.shape[1] > full else []
    return [shared] * (full // block) + rest


def _linear_input(ctx: BlockContext, name: str, x: torch.Tensor) -> torch.Tensor:
    """The input [tokens, n] a block linear receives when the block, as it stands, runs on x."""
    seen = []
    handle = ctx.linear(name).register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            ctx.block(x, ctx.rope, ctx.mask)
    finally:
        handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


def _starts(sizes: list[int]) -> list[int]:
    out, a = [], 0
    for b in sizes:
        out.append(a)
        a += b
    return out


@dataclass(frozen=True)
class DuQuantSettings(MethodSettings):
    alpha: float = setting(0.6, ALPHA_HELP, flag="--alpha")
    rotation_block: int = setting(128, "channels per block of the block-diagonal rotations")
    rotation_steps: int = setting(256, "steps per rotation: at most (greedy), or all, keeping the best prefix (study)")
    rotation: str = setting("greedy", "dllmq's greedy Hadamard rotations per block, fitted on the calibration set "
                            "(greedy), or the study's construction (study): its smoothing folds, one Givens-based "
                            "rotation shared by all blocks, fitted on the mean calibration window passed through "
                            "the already-quantized layers", choices=ROTATIONS, optional=True)
    study_grid: bool = setting(False, STUDY_GRID_HELP, optional=True)

    def check(self) -> None:
        check_alpha(self.alpha)
        if self.rotation not in ROTATIONS:
            raise DllmqError(f"rotation must be {' or '.join(ROTATIONS)}, got {self.rotation!r}.")
        if self.rotation_block < 1 or self.rotation_steps < 0:
            raise DllmqError(f"DuQuant's rotation block must be at least 1 and its steps at least 0, got "
                             f"{self.rotation_block} and {self.rotation_steps}.")


class DuQuant(Method):
    name = "duquant"
    display_name = "DuQuant"
    kind = WEIGHT_ACTIVATION
    transform = "rotation"
    Settings = DuQuantSettings
    propagate_quantized = False
    low_bit_act_clip = 0.9
    low_bit_weight_clip = 0.8

    @classmethod
    def paper_settings(cls, family: str | None) -> dict:
        # scripts/{llada,dream}_duquant.sh: --alpha 0.5 --lac 0.9 --swc 0.8 --block_size 128
        # --max_rotation_step 256, whatever the bits (the scripts run W8A8); main.py's --seed 2 for the
        # calibration windows and Q/K/V at the activation bits (Q/K through a Hadamard, clipped at lac)
        # (docs/fidelity.md, items 4, 6, 7).
        return dict(alpha=0.5, act_clip=0.9, weight_clip=0.8, rotation_block=128, rotation_steps=256, seed=2,
                    qkv_quant=True, rotation="study", study_grid=True)

    def __init__(self, config):
        super().__init__(config)
        # the study's rotation input: the mean calibration window, carried through the quantized blocks
        self._stream: torch.Tensor | None = None
        # one stream of draws for the random orthogonal factors, in calibration order (the study's global RNG)
        self._generator = torch.Generator().manual_seed(config.seed)

    def qk_hadamard_block(self) -> int | None:
        # QuantMatMul(rotate=None) builds get_hadamard(block_size) for Q and K when quant_method is duquant
        return self.settings.rotation_block

    def transform_block(self, ctx: BlockContext) -> None:
        """Smooth + rotate + permute every group of the block (exact in full precision)."""
        st = self.settings
        feats = ctx.group_inputs()
        for group in ctx.family.groups:
            inputs = feats[group.role]
            weights = [ctx.linear(n).weight for n in group.linears]
            s = smoothing_scales(channel_absmax(inputs), weights, st.alpha)
            transform = DuQuantTransform.fit(sample_tokens(inputs, MAX_TOKENS).float(), s, st.rotation_block,
                                             st.rotation_steps).to(weights[0].device)
            for name in group.linears:
                lin = OnlineLinear.wrap(ctx.linear(name))
                with torch.no_grad():
                    w = lin.weight.detach().double() * s.double().to(lin.weight.device)[None, :]
                    lin.weight.data = transform.double().orthogonal(w).to(lin.weight.dtype)
                transform.float()
                lin.input_transform = transform
                replace_module(ctx.block, name, lin)

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        if self.settings.rotation == "study":
            return self.study_quantize_block(ctx)
        self.transform_block(ctx)
        return round_block(ctx, self.weight_spec())

    def study_quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        """The study's duquant() for one block: smoothing from the full-precision statistics (folded where the
        source can carry it, divided online otherwise), then group by group in execution order, on the stream
        (the mean calibration window as the quantized blocks before left it): fit the rotation on the group's
        input as the block now computes it, rotate and quantize the group's weights, attach its activation
        quantizer. The block's output on the stream is the next block's."""
        st, cfg = self.settings, self.config
        feats = ctx.group_inputs()
        groups = ctx.family.groups
        scales = {g.role: group_scales(ctx, g, channel_absmax(feats[g.role]), st.alpha, "study", STUDY_SCALE_FLOOR)
                  .to(ctx.device) for g in groups}   # every s from the weights as they were (duquant() order)
        online = {}
        for g in groups:
            if g.reads_norm or can_fold(ctx, g):
                fold_scales(ctx, g, scales[g.role])
            else:
                online[g.role] = scales[g.role].float()
        if self._stream is None:   # rotate_inps = inps.mean(dim=0)
            total = sum(x.to(ctx.device).float().sum(0, keepdim=True) for x in ctx.inputs)
            self._stream = (total / sum(x.shape[0] for x in ctx.inputs)).to(ctx.inputs[0].dtype)
        stream = self._stream.to(ctx.device)
        if cfg.qkv_quant:
            ctx.block.kv_hook = QKVQuantizer(cfg.act.bits, cfg.act.clip, self.qk_hadamard_block())
        results = {}
        for g in groups:
            x = _linear_input(ctx, g.linears[0], stream)
            s = online.get(g.role)
            inv = torch.ones(x.shape[1], device=x.device) if s is None else 1 / s
            transform = DuQuantTransform.fit_study(x, inv, st.rotation_block, st.rotation_steps,
                                                   self._generator).to(x.device)
            for name in g.linears:
                lin = OnlineLinear.wrap(ctx.linear(name))
                with torch.no_grad():
                    w = lin.weight.detach().double()
                    if s is not None:
                        w = w * s.double()[None, :]
                    result = rtn_weight(transform.double().orthogonal(w), self.weight_spec())
                    transform.float()
                    lin.weight.data = result.weight.to(lin.weight.dtype)   # quantized for the rest of the pass
                lin.input_transform = transform
                lin.act_quantizer = ActQuantizer(cfg.act.bits, symmetric=cfg.act.sym, clip_ratio=cfg.act.clip,
                                                 format=cfg.act.format, study_grid=self.study_grid)
                replace_module(ctx.block, name, lin)
                results[name] = result
        with torch.no_grad():
            self._stream = ctx.block(stream, ctx.rope, ctx.mask)
        return results

    def input_transform(self, role: Role, in_features: int) -> nn.Module | None:
        return DuQuantTransform(in_features, self.settings.rotation_block)
