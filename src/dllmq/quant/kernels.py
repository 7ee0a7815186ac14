"""Real low-bit matmuls from plain PyTorch ops: the arithmetic behind dllmq's kernel backend.

Three integer paths, each checked against fake quantization (the reference) in the tests:

* int8 GEMM (``torch._int_mm``, int8 x int8 -> int32) for weight-activation models. Activations
  are quantized per token at run time with exactly the fake quantizer's formula, so the codes are
  the same integers; codes are stored shifted into int8 and the shift is undone exactly in int32:

      sum_i (c_i - zx)(q_i - zw) = A - zw * sum_i c'_i - zx' * sum_i (q_i - zw),   A = c' @ q'

  with ``c' = c - shift_x`` and ``q' = q - shift_w``. Below 8 bits the shift is the zero point
  itself (``c - z`` fits int8, no correction at all); at 8 bits it is 128 and the residual zero
  ``z - 128`` is corrected (it is 0 for symmetric grids). The int32 result is then scaled in float32
  by the token and channel scales: the integer path matches fake quantization up to float rounding.
* int4 weight-only GEMM (``aten._weight_int4pack_mm_for_cpu``). That op dequantizes a code ``q``
  as ``(q - 8) * scale + zero``, so GPTQ's integer zero point ``z`` becomes the float
  ``zero = (8 - z) * scale`` (exact in float32 for float16 scales). 3- and 2-bit codes fit the
  same 4-bit layout unchanged. The op runs in bf16/fp16 only at useful speed (its float32 path
  is a slow reference loop), and only wins for few rows, so large inputs (and float32 models)
  go through :func:`dequantize_int4`: one layer's weight is unpacked from the same packed buffer
  into the compute dtype for the duration of the matmul, never kept.
* int8 weight-only GEMM (``aten._weight_int8pack_mm``) for 5-8 bit weights with float activations.

``aten._convert_weight_to_int4pack_for_cpu`` writes a blocked layout that depends on the CPU
build; :func:`int4_layout` finds it by packing a probe matrix once, so codes can be read back
(for dequantization and for switching a model back to fake quantization) without assuming it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dllmq.errors import DllmqError
from dllmq.quant.formats import E4M3
from dllmq.quant.primitives import token_qparams

INT4_OP_GROUPS = (256, 128, 64, 32)   # group sizes the int4 op accepts, largest first
INT4_OP_MAX_ROWS = 128                # fewer rows: the int4 op; more: dequantize + dense GEMM (measured crossover)
_INT32_SAFE_K = 32_000                # K * 2 * 128 * 255 stays below 2^31 up to here


# --- activations ------------------------------------------------------------------------------

@dataclass
class Int8Rows:
    """Per-token quantized activations: ``x ~ (codes - zero) * scale`` with codes shifted into int8."""

    codes: torch.Tensor          # int8 [M, K]: c - shift
    scale: torch.Tensor          # float32 [M, 1] (or [1, 1] for a static grid)
    zero: torch.Tensor | None    # int32 [M] (or [1]): residual zero c's zero minus the shift; None if all 0
    row_sum: torch.Tensor | None = None  # int32 [M]: sum of each row's int8 codes, when asked for


def quantize_rows(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float = 1.0,
                  static: tuple[torch.Tensor, torch.Tensor] | None = None, reuse: bool = False,
                  row_sum: bool = False, signed_grid: bool = False, cpu_path: bool | None = None) -> Int8Rows:
    """Quantize each row of ``x`` [M, K] on its own grid, bit-identically to ``fake_quantize``
    with granularity "token" (or to a static per-tensor grid ``(scale, zero)``).

    ``reuse`` writes the codes into a shared scratch buffer (valid until the next call);
    ``row_sum`` also returns each row's code sum (needed against an asymmetric 8-bit weight).
    ``signed_grid``: QuaRot's symmetric scale max / (2^(b-1) - 1) (its codes still fit the same int8 range).

    Nothing here reads a tensor value back to the host, so on a GPU the call only queues kernels (about
    25, half of them on [M, 1] tensors). On the CPU the float32 copy lives in a reused buffer; elsewhere
    the division by the scale makes it (a bf16 row divided by a float32 scale is computed in float32), and
    one aminmax pass finds the range. ``cpu_path`` picks either form on any device (default: the device's);
    both give the same bits."""
    maxq = 2**bits - 1
    on_cpu = x.device.type == "cpu" if cpu_path is None else cpu_path
    if on_cpu or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        x = scratch("rows_f32", x.shape, torch.float32, x.device).copy_(x)  # float32, as fake quantization computes
    if static is not None:
        scale = static[0].float().reshape(1, 1)
        zero: torch.Tensor | float = static[1].float().reshape(1, 1)
    else:
        if on_cpu:  # amin/amax rather than aminmax: the latter is several times slower on CPU
            lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
        else:       # one pass; min and max of 16-bit values convert to float32 exactly
            lo, hi = (v.float() for v in torch.aminmax(x, dim=-1, keepdim=True))
        scale, zero = token_qparams(lo, hi, bits, symmetric, clip_ratio, signed_grid)
    # Same float32 division and rounding as primitives.quantize, so the integers are identical.
    t = x.div_(scale) if on_cpu else torch.div(x, scale)
    t.round_()
    residual = None
    if bits <= 7:  # c - z lies in [-maxq, maxq]: store it directly, no zero to correct
        t.clamp_(min=-zero, max=maxq - zero)
    else:          # c - 128 fits int8; the residual zero z - 128 is corrected after the GEMM
        if isinstance(zero, float):   # a dynamic symmetric grid: z = 128, nothing to shift
            t.clamp_(-128, 127)
        else:
            shift = zero - 128
            t.add_(shift).clamp_(-128, 127)
            if not symmetric:  # kept even where it is all 0: checking would read it back to the host
                residual = shift.reshape(-1).to(torch.int32)
    codes = scratch("rows_i8", t.shape, torch.int8, t.device) if reuse else torch.empty_like(t, dtype=torch.int8)
    codes.copy_(t)
    sums = None
    if row_sum:  # the same integers either way: on the CPU a float32 sum (exact below 2^24) is the faster one
        sums = t.sum(dim=-1, dtype=torch.float32).to(torch.int32) if on_cpu else codes.sum(dim=-1, dtype=torch.int32)
    return Int8Rows(codes, scale, residual, sums)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``x`` [M, K] in FP8 E4M3 with its own float32 scale amax / 448 (1 for a zero row):
    (codes as ``torch.float8_e4m3fn``, scales [M, 1]), the values ``formats.fake_quantize`` gives for FP8.
    The cast to float8_e4m3fn rounds to nearest even on the E4M3 grid, as ``E4M3.round`` does (the tests
    check this value for value), and the quotient never exceeds 448 by more than a rounding, so no value
    saturates. About eight kernels and no read-back; the formats' own path takes about twenty."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()        # max of |x| is exact in x's own dtype
    scale = torch.where(amax > 0, amax / E4M3.max_value, 1.0)
    return torch.div(x, scale).to(torch.float8_e4m3fn), scale


# --- int8 GEMM ----------------------------------------------------------------------------------

def int_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] @ int8 [N, K]^T -> int32 [M, N] (a scratch buffer on the CPU). CUDA's kernel wants
    M > 16 and M % 8 == 0 (K and N multiples of 8 are checked at conversion): rows are padded there."""
    m = a.shape[0]
    if a.is_cuda:
        return torch._int_mm(pad_rows_for_cuda(a), b_t.t())[:m]
    return torch._int_mm(a, b_t.t(), out=scratch("acc_i32", (m, b_t.shape[0]), torch.int32, a.device))


def pad_rows_for_cuda(a: torch.Tensor) -> torch.Tensor:
    """``a`` with zero rows appended up to what CUDA's int8 GEMM accepts (more than 16 rows, a multiple of 8),
    in one kernel; ``a`` itself when it already fits."""
    m = a.shape[0]
    if m > 16 and m % 8 == 0:
        return a
    return F.pad(a, (0, 0, 0, max(24, -(-m // 8) * 8) - m))


def int8_linear(x: Int8Rows, weight: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None,
                w_sum: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``(x codes - zx) @ (W codes - zw)^T`` exactly in int32, then ``* s_x * s_w (+ bias)``.

    ``weight`` int8 [N, K] holds ``q - shift_w``; ``w_zero`` int32 [N] the residual zero
    ``zw - shift_w`` (None when 0); ``w_sum`` int32 [N] the column sums ``sum_i (q_i - zw)``.
    """
    acc = int_mm(x.codes, weight)
    if w_zero is not None:
        sums = x.row_sum if x.row_sum is not None else x.codes.sum(dim=1, dtype=torch.int32)
        acc.addr_(sums, w_zero, alpha=-1)
    if x.zero is not None:
        acc.addr_(x.zero.expand(acc.shape[0]), w_sum, alpha=-1)
    if acc.device.type == "cpu":   # in place in float32 buffers: the CPU's mixed-dtype loops are not vectorized
        y = torch.empty(acc.shape, dtype=torch.float32) if out_dtype == torch.float32 else \
            scratch("out_f32", acc.shape, torch.float32, acc.device)
        y.copy_(acc)
        y.mul_(x.scale)
        y.mul_(w_scale)
        if bias is not None:
            y.add_(bias.float())
        return y if out_dtype == torch.float32 else y.to(out_dtype)
    return rescale_fused(acc, x.scale, w_scale, bias, out_dtype)


def rescale_fused(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """``acc * s_x * s_w (+ bias)`` in float32, rounded once to ``out_dtype``, in two or three kernels: the
    first multiply converts the int32 ``acc`` to float32 as a copy would, the last op writes ``out_dtype``
    directly. The same bits as int8_linear's CPU form (the tests check it), for devices where each kernel
    launch costs more than the elementwise work."""
    y = torch.mul(acc, x_scale)
    out = y if out_dtype == torch.float32 else torch.empty(acc.shape, dtype=out_dtype, device=acc.device)
    if bias is None:
        return torch.mul(y, w_scale, out=out)
    return torch.add(y.mul_(w_scale), bias.float(), out=out)


CONVERT_CHUNK = 1 << 20   # weights per chunk when a layer is converted (4 MiB of int32 temporaries)


def int8_weight_parts(codes_nk: torch.Tensor, zero: torch.Tensor, bits: int
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """From unsigned codes [N, K] and integer zeros [N]: (int8 ``q - shift``, residual zero int32
    [N] or None, column sums ``sum_i (q_i - z)`` int32 [N])."""
    n, k = codes_nk.shape
    z = zero.to(torch.int32)
    shift = z if bits <= 7 else torch.full_like(z, 128)
    residual = z - shift
    weight = torch.empty(n, k, dtype=torch.int8, device=codes_nk.device)
    w_sum = torch.empty(n, dtype=torch.int32, device=codes_nk.device)
    step = max(1, CONVERT_CHUNK // max(k, 1))   # rows at a time: int32 temporaries of one chunk, not the layer
    for i in range(0, n, step):
        q = codes_nk[i:i + step].to(torch.int32)
        w_sum[i:i + step] = (q - z[i:i + step, None]).sum(dim=1, dtype=torch.int32)
        weight[i:i + step] = q - shift[i:i + step, None]   # in [-128, 127]: the int8 cast is exact
    return weight, (residual if residual.any() else None), w_sum


def int32_safe(in_features: int) -> bool:
    """Whether int32 accumulation cannot overflow for this reduction length."""
    return in_features <= _INT32_SAFE_K


# --- int8 weight-only ---------------------------------------------------------------------------

def int8_weight_linear(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
                       w_zero: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """Float ``x`` [M, K] times int8 weights: ``s_w * (x @ q'^T - zw' * sum_i x_i)`` (+ bias).
    ``aten._weight_int8pack_mm`` on the CPU; elsewhere :func:`int8_weight_dequant_linear`."""
    if x.device.type != "cpu":
        return int8_weight_dequant_linear(x, weight, w_scale, w_zero, bias)
    scale = w_scale.to(x.dtype)
    y = torch.ops.aten._weight_int8pack_mm(x, weight, scale)
    if w_zero is not None:
        y = y - x.float().sum(dim=1, keepdim=True).mul(w_zero.float() * w_scale).to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y


def int8_weight_dequant_linear(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
                               w_zero: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """The same product with the weight dequantized for this call: ``(q - z) * s`` in float32 (an exact
    integer times the scale), rounded once to ``x.dtype``, then ``F.linear``: the very weight and matmul of
    fake quantization, so the result is its result. Plain torch ops (3 kernels and the GEMM), any device."""
    q = weight if w_zero is None else torch.sub(weight, w_zero[:, None])     # int32: q' - zw' = q - z, exact
    w = torch.empty(weight.shape, dtype=x.dtype, device=weight.device)
    torch.mul(q, w_scale.float()[:, None], out=w)                            # float32 product, one rounding
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# --- int4 layout --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Int4Layout:
    """How the int4 packing op lays out one block of ``block`` rows: packed bytes are
    ``[N / block, K, block / 2]``, byte ``j`` holding row ``lo_rows[j]`` (low nibble) and
    ``hi_rows[j]`` (high nibble) of that block at column k."""

    block: int
    lo_rows: tuple[int, ...]
    hi_rows: tuple[int, ...]

    @property
    def halves(self) -> bool:
        """Low nibbles hold the first half of the block's rows, high nibbles the second half."""
        half = self.block // 2
        return self.lo_rows == tuple(range(half)) and self.hi_rows == tuple(range(half, self.block))


def _convert(codes: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


@functools.lru_cache(maxsize=None)
def int4_layout() -> Int4Layout | None:
    """The int4 op's packed layout on this build, found by packing probes; None if the op is
    missing or its layout is not the blocked form described by :class:`Int4Layout`."""
    if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        return None
    n, k = 256, 6
    index = torch.arange(n * k).reshape(n, k)
    lo = torch.zeros(n * k // 2, dtype=torch.long)
    hi = torch.zeros(n * k // 2, dtype=torch.long)
    try:
        for digit in range(3):  # 3 hex digits name each of the n*k = 1536 positions
            packed = _convert((index >> (4 * digit)) & 15).reshape(-1).long()
            lo |= (packed & 15) << (4 * digit)
            hi |= (packed >> 4) << (4 * digit)
    except RuntimeError:
        return None
    # Byte b of block-row-group holds (row, col) = divmod(source, k); infer the block from column 1.
    lo_row, lo_col = lo // k, lo % k
    block = 2 * int((lo_col[: n // 2] == 0).sum()) if int(lo_col[0]) == 0 else 0
    if block <= 0 or n % block:
        return None
    half = block // 2
    layout = Int4Layout(block, tuple(lo_row[:half].tolist()), tuple((hi[:half] // k).tolist()))
    check = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0))
    if not torch.equal(unpack_int4(_convert(check), n, k, layout), check.to(torch.uint8).t()):
        return None
    return layout


def pack_int4(codes_nk: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Unsigned codes [N, K] (values 0..15, N a multiple of the layout block) -> the op's packed uint8.
    Given the layout's ``block``, whole blocks of rows are packed a chunk at a time (each block's bytes are
    its own, so the result is the same) and the op's int32 input is one chunk, not the layer."""
    n, k = codes_nk.shape
    step = n if block is None else max(block, CONVERT_CHUNK // max(k, 1) // block * block)
    if step >= n:
        return _convert(codes_nk)
    return torch.cat([_convert(codes_nk[i:i + step]) for i in range(0, n, step)])


def unpack_int4(packed: torch.Tensor, n: int, k: int, layout: Int4Layout,
                out: torch.Tensor | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The codes of a packed int4 weight as uint8 ``[K, N]`` (the transposed weight), or only
    input rows ``rows = (start, stop)`` of it."""
    b, half = layout.block, layout.block // 2
    v = packed.view(n // b, k, half).transpose(0, 1)            # [K, NB, half]
    if rows is not None:
        v = v[rows[0]:rows[1]]
    out = torch.empty(v.shape[0], n, dtype=torch.uint8, device=packed.device) if out is None else out
    blocks = out.view(v.shape[0], n // b, b)
    if layout.halves:  # the usual case: two strided writes, no index tensor
        torch.bitwise_and(v, 15, out=blocks[:, :, :half])
        torch.bitwise_right_shift(v, 4, out=blocks[:, :, half:])
    else:
        blocks[:, :, list(layout.lo_rows)] = v & 15
        blocks[:, :, list(layout.hi_rows)] = v >> 4
    return out


def int4_scales_zeros(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The op's ``[G, N, 2]`` (scale, zero) for GPTQ ``scale``/``zero`` [G, N]: ``(8 - z) * s``."""
    s = scale.float()
    return torch.stack([s, (8 - zero.float()) * s], dim=-1).to(dtype).contiguous()


_DEQUANT_CHUNK = 1 << 20      # weights per float32 chunk on the CPU (4 MiB): stays in cache, bounds scratch memory
_DEQUANT_CHUNK_GPU = 1 << 25  # off the CPU (128 MiB of float32): an 8B layer in one chunk, few kernel launches


def dequantize_int4(packed: torch.Tensor, n: int, k: int, layout: Int4Layout, scale: torch.Tensor,
                    zero: torch.Tensor, group: int, dtype: torch.dtype, fused: bool | None = None) -> torch.Tensor:
    """The weight transposed, ``W^T`` [K, N] in ``dtype``: ``(q - z) * s`` per group of ``group``
    input rows, computed in float32 exactly as fake quantization does, then rounded to ``dtype``.
    The result lives in a shared scratch buffer (one layer's size): valid until the next call.

    ``fused`` (the default off the CPU): large chunks, and the codes are widened inside the subtraction
    and the product is rounded inside the multiply (float32 arithmetic either way): 4 kernels per chunk
    instead of 5 plus a copy, the same bits. The CPU keeps the measured in-place form in cached buffers."""
    on_cpu = packed.device.type == "cpu"
    fused = not on_cpu if fused is None else fused
    out = scratch("int4_w", (k, n), dtype, packed.device)
    step = max(1, (_DEQUANT_CHUNK if on_cpu else _DEQUANT_CHUNK_GPU) // (group * n))  # groups per chunk
    z, s = zero.float()[:, None, :], scale.float()[:, None, :]
    for g0 in range(0, k // group, step):
        g1 = min(g0 + step, k // group)
        rows = (g0 * group, g1 * group)
        codes = unpack_int4(packed, n, k, layout, rows=rows,
                            out=scratch("int4_codes", (rows[1] - rows[0], n), torch.uint8, packed.device))
        target = out[rows[0]:rows[1]].view(g1 - g0, group, n)
        if fused:
            torch.mul(torch.sub(codes.view(g1 - g0, group, n), z[g0:g1]), s[g0:g1], out=target)
            continue
        w = target if dtype == torch.float32 else scratch("int4_f32", (g1 - g0, group, n), torch.float32,
                                                          packed.device)
        w.copy_(codes.view(g1 - g0, group, n))
        w.sub_(z[g0:g1]).mul_(s[g0:g1])
        if dtype != torch.float32:
            target.copy_(w)
    return out


def int4_linear(x: torch.Tensor, packed: torch.Tensor, n: int, layout: Int4Layout | None,
                scale: torch.Tensor, zero: torch.Tensor, sz: torch.Tensor | None, group: int,
                bias: torch.Tensor | None) -> tuple[torch.Tensor, str]:
    """``x`` [M, K] times a packed int4 weight; returns (y [M, n], the path taken).

    On the CPU the int4 op for 16-bit inputs with few rows; otherwise (and always off the CPU, where the
    CPU op's packing is only a storage format) one layer's weight is dequantized into ``x.dtype`` for this
    matmul and dropped afterwards.
    """
    m, k = x.shape
    use_op = (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
              and (m < INT4_OP_MAX_ROWS or layout is None))
    if use_op:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group, sz.to(x.dtype))
        path = "int4_op"
    else:
        if layout is None:
            raise DllmqError("this int4 layer has no known packed layout to dequantize; this is a bug in dllmq.")
        w_t = dequantize_int4(packed, packed.shape[0], k, layout, scale, zero, group, x.dtype)
        y = x @ w_t
        path = "int4_dequant"
    if y.shape[1] != n:
        y = y[:, :n]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y, path


def kernel_group(group_size: int, in_features: int) -> int | None:
    """The largest group size the int4 op accepts that divides both the layer's group size and K
    (per-group scales are then repeated exactly), or None."""
    for g in INT4_OP_GROUPS:
        if group_size % g == 0 and in_features % g == 0:
            return g
    return None


# --- scratch memory ---------------------------------------------------------------------------

# Large temporaries are reused across calls: a fresh CPU allocation of a few MiB costs page faults
# comparable to the elementwise work itself. One buffer per role, grown to the largest size seen
# (for a dequantized weight: the largest layer, shared by all layers). Not thread-safe.
_SCRATCH: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}


def scratch(role: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    """A reusable tensor of ``shape`` for ``role`` (contents undefined); plain empty off the CPU."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    n = math.prod(shape)
    key = (role, dtype, device)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):  # a normal tensor: written in place in and out of inference mode
            buf = _SCRATCH[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def release_scratch() -> int:
    """Free the scratch buffers; returns the bytes released."""
    freed = sum(b.numel() * b.element_size() for b in _SCRATCH.values())
    _SCRATCH.clear()
    return freed


def scratch_bytes() -> int:
    return sum(b.numel() * b.element_size() for b in _SCRATCH.values())


def round_up(n: int, multiple: int) -> int:
    return math.ceil(n / multiple) * multiple
