"""GPTQ's solver (Frantar et al., 2022). Shared math: the GPTQ method uses it, and QuaRot quantizes its
rotated weights with it.

Per linear: H = 2/N sum x x^T over the calibration tokens; dead inputs (H_ii = 0) get H_ii = 1 and a
zero weight column; damping `damp` x mean(diag H), raised and retried with a warning if the Cholesky
factorisation fails; H^-1 through Cholesky, then its upper Cholesky factor; columns quantized one by
one in a chosen order with each rounding error pushed onto the columns not yet quantized, lazily in
blocks of 128. The linears of a group read the same input, share H and are solved as one stacked
matrix. Inside a block the groups go true-sequentially: q/k/v, then attention out, then gate/up,
then down, each calibrated on inputs produced by the already-quantized groups before it.

The choices GPTQSettings exposes, and what the reference code (the study's) does:

- column order: natural (reference), act-order (decreasing diag H, `act_order`), or group-aware
  act-order (`group_act_order`: groups stay contiguous, ordered by their largest diag H, columns
  by decreasing diag H inside each group);
- group grids: fixed when each group starts from the error-updated weights (reference), or all
  fixed up front from the original weights (`static_grids`; act-order with static groups does this
  too);
- grid range: min/max of the weights (reference) or the shrink of it that minimises the group's
  weight rounding error (`grid_search`, a search over `grid_points` shrink factors down to
  `grid_min_shrink`).

The Hessian is accumulated window by window in fixed chunks of tokens, so neither the batching of
the calibration windows nor the number of threads changes it; the column loop runs on one thread,
and the grids fixed up front (elementwise ops and row reductions, which threads split by row) use
every thread, so the result does not depend on the thread count either.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from dllmq.errors import DllmqError
from dllmq.models.family import Role
from dllmq.quant.block import BlockContext, QuantizedWeight
from dllmq.quant.formats import Format, Minifloat, block_scales, weight_tensor_scale
from dllmq.quant.primitives import QuantSpec, compute_qparams, token_qparams
from dllmq.quant.rounding import round_scales
from dllmq.quant.specs import MethodSettings, WeightSpec, setting

log = logging.getLogger(__name__)

# Tokens per Hessian update: X^T X over many tokens is split across threads by the BLAS library
# (so its rounding depends on the thread count); over at most this many it is not, and a window
# is always cut at the same places whatever batch it arrives in.
HESSIAN_CHUNK = 512


def hessian_panel_rows(n_in: int) -> int:
    """Rows of each lower-triangle panel the Hessian is accumulated in (see HessianAccumulator): about
    n/8 (the triangle then costs ~56 % of the full product), at least 96 so the products stay efficient."""
    return max(96, -(-n_in // 8 // 32) * 32)


class HessianAccumulator:
    """H = 2/N sum_t w_t x_t x_t^T in float32 (float64 when asked, for tests); w_t = 1 unless token
    weights are given (--weighting: dllmq.quant.dllm_calib), N counts tokens either way.

    `add` takes any [..., n_in] tensor (and optionally its token weights [...]); every row run of at
    most HESSIAN_CHUNK tokens of each leading index (window) is added as one product, in order, to a
    running sum, so the result is the same bit for bit however the windows are batched and however
    many threads run. Weights of 1 give exactly the unweighted sum (x * 1 is x).

    The sum is symmetric, so only its lower triangle is computed: row panels S[j:j+b, :j+b], each its
    own contiguous running sum, mirrored into the full matrix when `S` is read. Each element is the
    same product over the same chunk as in the full X^T X (BLAS sums an element's chunk in the same
    order whatever the output tile; a test checks the two agree bit for bit), at ~60 % of its cost."""

    def __init__(self, n_in: int, device, dtype=torch.float32):
        rows = hessian_panel_rows(n_in)
        self._starts = list(range(0, n_in, rows))
        self._panels = [torch.zeros(min(rows, n_in - j), min(j + rows, n_in), device=device, dtype=dtype)
                        for j in self._starts]
        self._n_in, self._S = n_in, None
        self.n = 0

    def add(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        x = x.detach()
        windows = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() >= 2 else x.reshape(1, 1, -1)
        dtype, device = self._panels[0].dtype, self._panels[0].device
        if weights is not None:
            weights = weights.reshape(windows.shape[:2]).to(device=device, dtype=dtype)
        self._S = None
        for i, window in enumerate(windows):
            for k, chunk in enumerate(window.split(HESSIAN_CHUNK)):
                c = chunk.to(dtype)
                left = c if weights is None else c * weights[i, k * HESSIAN_CHUNK:k * HESSIAN_CHUNK + c.shape[0], None]
                for j, panel in zip(self._starts, self._panels):
                    panel.addmm_(left[:, j:j + panel.shape[0]].T, c[:, :panel.shape[1]])
                self.n += c.shape[0]

    @property
    def S(self) -> torch.Tensor:
        """sum_t w_t x_t x_t^T [n_in, n_in] (the panels' lower triangle, mirrored)."""
        if self._S is None:
            S = torch.zeros(self._n_in, self._n_in, device=self._panels[0].device, dtype=self._panels[0].dtype)
            for j, panel in zip(self._starts, self._panels):
                S[j:j + panel.shape[0], :panel.shape[1]] = panel
            S.tril_()
            self._S = S + S.tril(-1).T
        return self._S

    @property
    def H(self) -> torch.Tensor:
        return self.S * (2 / max(self.n, 1))


@contextmanager
def one_thread():
    """Run a block of torch ops on one thread (restoring the count after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _row_grid(w: torch.Tensor, bits: int, sym: bool, signed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min/max grid of a column slice [out, k]; scales rounded to their stored float16 value."""
    spec = QuantSpec(bits=bits, symmetric=sym, granularity="channel", signed_grid=signed)
    scale, zero = compute_qparams(w, spec)
    return round_scales(scale.reshape(-1)), zero.reshape(-1).to(torch.float32)


def _range_grid(lo: torch.Tensor, hi: torch.Tensor, bits: int, sym: bool, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """_row_grid from the rows' min `lo` and max `hi` ([out, 1], left unchanged), bit for bit."""
    scale, zero = token_qparams(lo.clone(), hi.clone(), bits, sym, signed_grid=signed)
    scale = round_scales(scale.reshape(-1))
    return scale, (torch.full_like(scale, zero) if isinstance(zero, float) else zero.reshape(-1))


def _fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Rows of w [out, k] on the per-row grid (scale, zero) [out]: exactly quantize -> dequantize."""
    s, z = scale[:, None], zero[:, None]
    return torch.div(w, s).round_().add_(z).clamp_(0, maxq).sub_(z).mul_(s)


def _rounding_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, norm: float) -> torch.Tensor:
    """sum |w - q|^norm of each row of w on its grid (in place on one temporary)."""
    return _fake_quant(w, scale, zero, maxq).sub_(w).abs_().pow_(norm).sum(1)


def group_grid(w: torch.Tensor, bits: int, sym: bool, search: bool = False, points: int = 20,
               min_shrink: float = 0.5, norm: float = 2.4, signed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-row grid of one group of columns w [out, k]: its min/max range, or with `search` the
    range shrunk by the factor (1, 1 - (1 - min_shrink)/points, ..., min_shrink) whose rounding error
    sum |w - q|^norm is smallest, row by row. `signed`: the symmetric grid's scale is max / (2^(b-1) - 1).

    A shrunk range is the row's min and max times the factor: min(w c) is min(w) c exactly (c > 0 and
    float rounding is monotone), so the rows are scanned for their range once, not once per factor.
    Every op is elementwise or a row reduction split across threads by row, so the thread count does
    not change the result."""
    scale, zero = _row_grid(w, bits, sym, signed)
    if not search:
        return scale, zero
    maxq = 2 ** bits - 1
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    best = _rounding_error(w, scale, zero, maxq, norm)
    for i in range(1, points + 1):
        c = 1 - (1 - min_shrink) * i / points
        s, z = _range_grid(lo * c, hi * c, bits, sym, signed)
        err = _rounding_error(w, s, z, maxq, norm)
        better = err < best
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def _all_group_grids(W: torch.Tensor, g: int, grid) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`grid` of every group of g columns of W [out, in], as [grid(W[:, j:j + g]) for each j]. A grid is
    computed row by row, so the whole groups go in one call as the rows of W reshaped to [out * groups, g]
    (one large search instead of one per group; the same values, bit for bit); a narrower last group
    goes alone."""
    n_out, n_in = W.shape
    full = n_in // g
    grids = []
    if full:
        scale, zero = grid(W[:, :full * g].reshape(n_out * full, g))
        scale, zero = scale.reshape(n_out, full), zero.reshape(n_out, full)
        grids = [(scale[:, k].contiguous(), zero[:, k].contiguous()) for k in range(full)]
    if full * g < n_in:
        grids.append(grid(W[:, full * g:]))
    return grids


def inverse_hessian_factor(H: torch.Tensor, damp: float, retries: int = 4) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1; damping x10 per failed attempt."""
    for attempt in range(retries + 1):
        Hd = H.clone()
        Hd.diagonal().add_(damp * Hd.diagonal().mean())
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
        if attempt < retries:
            log.warning("GPTQ: Hessian not positive definite at damp %.3g; retrying with %.3g", damp, damp * 10)
            damp *= 10
    raise DllmqError("GPTQ could not factorise a layer's Hessian even with heavy damping; "
                     "use more calibration samples or RTN for this model.")


def column_order(diag: torch.Tensor, group_size: int, act_order: bool, group_act_order: bool) -> torch.Tensor | None:
    """The order columns are quantized in (None = natural): group-aware when asked (whole groups by
    decreasing max diag H, columns by decreasing diag H inside each group), else decreasing diag H
    with act-order."""
    if not group_act_order:
        return torch.argsort(diag, descending=True, stable=True) if act_order else None
    n = diag.numel()
    starts = list(range(0, n, group_size))
    inside = [torch.argsort(diag[j:j + group_size], descending=True, stable=True) + j for j in starts]
    peaks = torch.stack([diag[j:j + group_size].max() for j in starts])
    return torch.cat([inside[k] for k in torch.argsort(peaks, descending=True, stable=True).tolist()])


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = 128, sym: bool = False,
                  damp: float = 0.01, blocksize: int = 128, act_order: bool = False,
                  static_groups: bool = True, *, group_act_order: bool = False, static_grids: bool = False,
                  grid_search: bool = False, grid_points: int = 20, grid_min_shrink: float = 0.5,
                  fmt: Format | None = None, tensor_scale: torch.Tensor | None = None, signed_grid: bool = False):
    """Quantize W [out, in] against the Hessian H [in, in]. The keyword defaults are the reference's.

    With a floating-point `fmt` (dllmq.quant.formats) each group's grid is the format's scale rule on the
    group's columns (the group is the format's block, or the whole row for FP8) and columns round to the
    format's elements; `tensor_scale` ([out, 1], NVFP4) is the tensor scale of each row's matrix. The
    grid search does not apply (the format fixes its scales); zero is 0. `signed_grid`: symmetric grids
    scaled max / (2^(b-1) - 1) (QuaRot's code) instead of 2 max / (2^b - 1).

    Returns (Q dequantized [out, in], scale [out, n_groups], zero [out, n_groups], g_idx [in] or None).
    """
    float_format = fmt is not None and fmt.is_float
    W = W.detach().clone().to(H.dtype)
    H = H.clone()
    n_out, n_in = W.shape
    g = n_in if group_size == -1 else group_size
    n_groups = -(-n_in // g)
    maxq = 2 ** bits - 1
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    def grid(w):
        if float_format:
            scale = block_scales(w, replace(fmt, block=0), tensor_scale)[0].reshape(-1)
            return scale, torch.zeros_like(scale)
        return group_grid(w, bits, sym, grid_search, grid_points, grid_min_shrink, signed=signed_grid)

    act_order = act_order and not group_act_order     # group-aware ordering replaces plain act-order
    perm = column_order(H.diagonal(), g, act_order, group_act_order)
    # the group of each column in processing order; dynamic act-order groups follow that order
    natural = torch.arange(n_in, device=W.device) // g
    dynamic_act = act_order and not static_groups
    pos_group = natural if perm is None or dynamic_act else natural[perm]
    static = None
    if static_grids or (act_order and static_groups):  # every grid from the original weights, up front
        static = [grid(W[:, j:j + g]) for j in range(0, n_in, g)] if float_format else \
            _all_group_grids(W, g, grid)
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]

    with one_thread():   # the column loop's small products on one thread: their rounding then never varies
        U = inverse_hessian_factor(H, damp)
        Q = _solve_columns(W, U, pos_group.tolist(), static, grid, maxq, blocksize,
                           fmt.element if float_format else None)
    scales = torch.zeros(n_out, n_groups, dtype=torch.float32, device=W.device)
    zeros = torch.zeros_like(scales)
    for k, (s, z) in Q[1].items():
        scales[:, k], zeros[:, k] = s, z
    Q = Q[0]
    g_idx = natural.to(torch.int32)
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
        g_idx = torch.empty_like(g_idx)
        g_idx[perm] = pos_group.to(torch.int32)
    return Q, scales, zeros, None if torch.equal(g_idx.long(), natural) else g_idx


# Columns per inner step of the lazy updates: each column's error moves only the rest of its inner
# step at once (a small rank-1 update), the rest of the block follows per inner step as one product.
_INNER = 16


def _solve_columns(W: torch.Tensor, U: torch.Tensor, groups: list[int], static, grid, maxq: int,
                   blocksize: int, element: Minifloat | None = None) -> tuple[torch.Tensor, dict]:
    """GPTQ's column loop on W [out, in] (columns already in processing order) with U the upper
    Cholesky factor of the damped inverse Hessian. Works on W transposed, so a column is a contiguous
    row. Columns round to the integer grid, or with `element` to that float format times the group's
    scale (a zero scale, an NVFP4 block below E4M3's range, gives zeros). Returns (Q in processing
    order, {group: (scale, zero)})."""
    n_in = W.shape[1]
    Wt = W.T.contiguous()                      # [in, out]: row i is column i of W
    Qt = torch.empty_like(Wt)
    grids: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    diag = U.diagonal().tolist()
    scale = lo = hi = None
    for i1 in range(0, n_in, blocksize):
        i2 = min(i1 + blocksize, n_in)
        W1 = Wt[i1:i2].clone()                   # updated within the block; Wt keeps the block's start
        E1 = torch.empty_like(W1)
        for j1 in range(0, i2 - i1, _INNER):
            j2 = min(j1 + _INNER, i2 - i1)
            for j in range(j1, j2):
                col = i1 + j
                group = groups[col]
                if col == 0 or groups[col - 1] != group:
                    if static is not None:
                        scale, zero = static[group]
                    else:
                        # a group starts: fix its grid from the weights as the reference does (lazy
                        # updates of the current block not yet applied; the same when the group
                        # starts a block)
                        end = col + 1
                        while end < n_in and groups[end] == group:
                            end += 1
                        scale, zero = grid(Wt[col:end].T)
                    grids[group] = (scale, zero)
                    lo, hi = -zero, maxq - zero
                    if element is not None:
                        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
                q = Qt[col]
                if element is not None:
                    q.copy_(element.round(W1[j] / safe).mul_(scale))
                else:
                    torch.div(W1[j], scale, out=q)
                    q.round_().clamp_(lo, hi).mul_(scale)
                e = E1[j]
                torch.sub(W1[j], q, out=e)
                e.div_(diag[col])
                if j + 1 < j2:
                    W1[j + 1:j2].addr_(U[col, i1 + j + 1:i1 + j2], e, alpha=-1)
            if j2 < i2 - i1:
                W1[j2:].addmm_(U[i1 + j1:i1 + j2, i1 + j2:i2].T, E1[j1:j2], alpha=-1)
        if i2 < n_in:
            Wt[i2:].addmm_(U[i1:i2, i2:].T, E1, alpha=-1)
    return Qt.T, grids


def relative_output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """||(W - Q) X|| / ||W X|| over the calibration inputs, from H (which is proportional to X X^T)."""
    D = (W - Q).to(H.dtype)
    num = torch.einsum("oi,ij,oj->", D, H, D)
    den = torch.einsum("oi,ij,oj->", W.to(H.dtype), H, W.to(H.dtype))
    return math.sqrt(max(num.item(), 0.0) / max(den.item(), 1e-30))


@dataclass(frozen=True)
class GPTQSettings(MethodSettings):
    """dllmq's GPTQ defaults: act-order with static groups, damping 0.05 and a grid search (what wins on
    a real model, docs/quantization.md). The study's code ran damp=0.01, act_order=False,
    grid_search=False (its other settings are these defaults)."""

    damp: float = setting(0.05, "damping, a fraction of mean diag(H)", flag="--damp")
    blocksize: int = setting(128, "columns per lazy error-update block")
    act_order: bool = setting(True, "columns in natural order instead of decreasing Hessian diagonal",
                              flag="--no-act-order", invert=True)
    static_groups: bool = setting(True, "with act-order: groups follow the permuted order instead of static "
                                        "natural groups", flag="--dynamic-groups", invert=True)
    group_act_order: bool = setting(False, "group-aware act-order instead of act-order: whole groups by decreasing "
                                           "max Hessian diagonal, columns by decreasing diagonal inside each group "
                                           "(GPTQModel's default)", flag="--group-act-order")
    static_grids: bool = setting(False, "every group's grid from the original weights, fixed up front",
                                 flag="--static-grids")
    grid_search: bool = setting(True, "each group's grid from its min/max instead of the shrink that minimises "
                                      "its rounding error", flag="--no-grid-search", invert=True)
    grid_points: int = setting(20, "shrink factors the grid search tries")
    grid_min_shrink: float = setting(0.5, "the grid search shrinks the range down to this fraction")

    # Before these settings existed GPTQ ran min/max grids in natural or act-order.
    STORED_BEFORE = {"group_act_order": False, "static_grids": False, "grid_search": False}

    def check(self) -> None:
        if not 0 < self.damp < 1:
            raise DllmqError(f"GPTQ damping must be in (0, 1), got {self.damp}.")
        if self.blocksize < 1:
            raise DllmqError(f"GPTQ's block size must be at least 1, got {self.blocksize}.")
        if self.grid_points < 1:
            raise DllmqError(f"GPTQ's grid search needs at least 1 point, got {self.grid_points}.")
        if not 0 < self.grid_min_shrink <= 1:
            raise DllmqError(f"GPTQ's grid_min_shrink must be in (0, 1], got {self.grid_min_shrink}.")

    def solver_options(self) -> dict:
        return dict(damp=self.damp, blocksize=self.blocksize, act_order=self.act_order,
                    static_groups=self.static_groups, group_act_order=self.group_act_order,
                    static_grids=self.static_grids, grid_search=self.grid_search, grid_points=self.grid_points,
                    grid_min_shrink=self.grid_min_shrink)


def check_float_format(fmt: Format, settings: GPTQSettings) -> None:
    """GPTQ stores a floating-point format's weights without g_idx: its groups must stay the natural blocks."""
    if settings.act_order and not settings.static_groups and not settings.group_act_order:
        raise DllmqError(f"GPTQ with --wformat {fmt.name} keeps the format's natural blocks; --dynamic-groups "
                         "would permute them, so leave it out.")


def gptq_block(ctx: BlockContext, spec: WeightSpec, settings: GPTQSettings) -> dict[str, QuantizedWeight]:
    """GPTQ on every linear of a block, true-sequentially: each group is calibrated on the outputs of
    the already-quantized groups before it. The linears of a group share one Hessian and are solved
    together (their rows stacked: every row's grid and codes are its own)."""
    results: dict[str, QuantizedWeight] = {}
    ahead: dict[Role, HessianAccumulator] = {}
    down_first = ctx.config is not None and ctx.config.calibration.group_order == "down-first"
    fmt = spec.fmt
    options = settings.solver_options()
    if fmt.is_float:
        check_float_format(fmt, settings)
        options["grid_search"] = False   # the format's scale rule is the grid
    for group, feed in ctx.sequential():
        names = ctx.quantized(group.linears)      # linears kept in full precision are left as they are
        if down_first and group.role == Role.MLP_IN:
            # the study's LLaDA order: down's Hessian from gate/up as they are now, before they are quantized
            down = ctx.family.group(Role.MLP_OUT)
            if ctx.quantized(down.linears):
                ahead[Role.MLP_OUT] = HessianAccumulator(ctx.linear(down.linears[0]).in_features, ctx.device)
                ctx.feed_ahead(down, ctx.weighted(ahead[Role.MLP_OUT].add))
        if not names:
            continue
        linears = [ctx.linear(name) for name in names]
        hessian = ahead.pop(group.role, None)
        if hessian is None:
            hessian = HessianAccumulator(linears[0].in_features, ctx.device)
            feed(ctx.weighted(hessian.add))     # token weights (--weighting) when the run has them
        H = hessian.H
        W = torch.cat([l.weight.detach().float() for l in linears])
        scales = [weight_tensor_scale(l.weight, fmt) for l in linears] if fmt.is_float else [None]
        tensor_scale = None if scales[0] is None else \
            torch.cat([s.expand(l.out_features, 1) for s, l in zip(scales, linears)]).to(W.device)
        Q, scale, zero, g_idx = gptq_quantize(W, H, spec.bits, spec.group_size, spec.sym, **options,
                                              fmt=fmt, tensor_scale=tensor_scale, signed_grid=spec.signed_grid)
        row = 0
        for k, (name, linear) in enumerate(zip(names, linears)):
            rows = slice(row, row + linear.out_features)
            row += linear.out_features
            err = relative_output_error(W[rows], Q[rows], H)
            results[name] = QuantizedWeight(Q[rows].float(), scale[rows], zero[rows], g_idx, err, "output",
                                            scales[k] if fmt.is_float else None)
            linear.weight.data = Q[rows].to(linear.weight.dtype)  # later groups calibrate on quantized outputs
    return results
