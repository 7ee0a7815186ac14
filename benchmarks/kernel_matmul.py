"""Per-layer matmul time of dllmq's kernel layers at LLaDA-8B shapes, as ratios to bf16.

For each weight shape (in x out) and row count M (tokens per forward: a diffusion step runs the
whole sequence), times one linear layer: fp32 and bf16 F.linear, the W8A8 kernel layer
(per-token int8 activations incl. their quantization, int8 GEMM, rescale; bf16 and fp32
activations), the int8 GEMM alone, QuaRot's online fast Hadamard on the input, the W4A16-g128 kernel layer (automatic path) and both of its
paths forced (the int4 op; per-call dequantization + bf16 GEMM), and the fake-quantization
QuantLinear for W8A8 and W4A16 (bf16). All in one process, one after another per M.

    python benchmarks/kernel_matmul.py                      # 4096x4096, 4096x12288, 12288x4096; M 64..1024
    python benchmarks/kernel_matmul.py --tiny               # smoke test: small shapes, one repeat
    python benchmarks/kernel_matmul.py --shapes 4096x4096 --rows 512 --repeats 5 --no-fake
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from dllmq.quant import kernels as K
from dllmq.quant.activations import ActQuantizer
from dllmq.quant.backend import Int4WeightLinear, Int8DynamicLinear, to_kernel
from dllmq.quant.hadamard import HadamardTransform
from dllmq.quant.primitives import QuantSpec, compute_qparams
from dllmq.quant.qlinear import QuantLinear


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: scratch buffers, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def quant_linear(weight: torch.Tensor, bits: int, group: int, act_bits: int | None) -> QuantLinear:
    """RTN-quantized QuantLinear (asymmetric weights; per-token asymmetric activations if act_bits)."""
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=False)
    lin.weight.data = weight
    spec = QuantSpec(bits, symmetric=False, granularity="channel" if group == -1 else "group",
                     group_size=None if group == -1 else group)
    scale, zero = compute_qparams(weight, spec)
    if group == -1:
        scale, zero = scale.reshape(out_f, 1), zero.reshape(out_f, 1)
    q = QuantLinear.from_float(lin, scale, zero, bits, group)
    if act_bits:
        q.act_quantizer = ActQuantizer(act_bits)
    return q


def bench_shape(in_f: int, out_f: int, rows: list[int], repeats: int, fake: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=gen) * 0.02
    w_bf16 = w.bfloat16()
    q8 = quant_linear(w, 8, -1, 8)
    q4 = quant_linear(w, 4, 128, None)
    k8: Int8DynamicLinear = to_kernel(q8)
    k4: Int4WeightLinear = to_kernel(q4)
    assert isinstance(k8, Int8DynamicLinear) and isinstance(k4, Int4WeightLinear)
    if not fake:
        del q8, q4
    sz = k4._op_scales(torch.bfloat16)
    hadamard = HadamardTransform(in_f)  # QuaRot's online transform before the down projection
    results = []
    for m in rows:
        x = torch.randn(m, in_f, generator=gen)
        xb = x.bfloat16()
        a8 = torch.randint(-128, 128, (m, in_f), dtype=torch.int8, generator=gen)
        r: dict[str, float] = {"M": m}
        with torch.inference_mode():
            r["fp32"] = median_ms(lambda: F.linear(x, w), repeats)
            r["bf16"] = median_ms(lambda: F.linear(xb, w_bf16), repeats)
            r["w8a8 bf16"] = median_ms(lambda: k8(xb), repeats)
            r["w8a8 fp32"] = median_ms(lambda: k8(x), repeats)
            r["int8 gemm"] = median_ms(lambda: K.int_mm(a8, k8.weight), repeats)
            r["hadamard"] = median_ms(lambda: hadamard(xb), repeats)
            r["w4a16"] = median_ms(lambda: k4(xb), repeats)
            r["w4a16 op"] = median_ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                xb, k4.packed, k4.group, sz), repeats)
            r["w4a16 deq"] = median_ms(lambda: xb @ K.dequantize_int4(
                k4.packed, k4.n_pad, in_f, k4.layout, k4.scales, k4.zeros, k4.group, torch.bfloat16), repeats)
            if fake:
                r["fake w8a8"] = median_ms(lambda: q8(xb), 1)
                r["fake w4a16"] = median_ms(lambda: q4(xb), 1)
        results.append(r)
        print(format_row(in_f, out_f, r), flush=True)
    bytes_bf16 = in_f * out_f * 2
    print(f"  weight memory vs bf16 ({bytes_bf16 / 2**20:.1f} MiB): "
          f"W8A8 kernel {k8.storage_bytes() / bytes_bf16:.3f}x, "
          f"W4A16-g128 kernel {k4.storage_bytes() / bytes_bf16:.3f}x"
          + (f", fake W4A16 QuantLinear {q4.storage_bytes() / bytes_bf16:.3f}x" if fake else ""), flush=True)
    return results


COLUMNS = ["fp32", "bf16", "w8a8 bf16", "w8a8 fp32", "int8 gemm", "hadamard", "w4a16", "w4a16 op", "w4a16 deq",
           "fake w8a8", "fake w4a16"]


def header() -> str:
    return f"{'shape':>12} {'M':>5} " + " ".join(f"{c:>17}" for c in COLUMNS)


def format_row(in_f: int, out_f: int, r: dict) -> str:
    cells = []
    for c in COLUMNS:
        if c in r:
            cells.append(f"{r[c]:9.2f} ({r[c] / r['bf16']:5.2f})")
        else:
            cells.append(f"{'-':>17}")
    return f"{in_f:>5}x{out_f:<6} {r['M']:>5} " + " ".join(cells)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4096x4096,4096x12288,12288x4096", help="in x out, comma-separated")
    p.add_argument("--rows", default="64,128,256,512,1024", help="M values (tokens per forward)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-fake", action="store_true", help="skip the (slow) fake-quantization timings")
    p.add_argument("--tiny", action="store_true", help="smoke test: 256x512 shapes, M 16,64, 1 repeat")
    args = p.parse_args()
    if args.tiny:
        args.shapes, args.rows, args.repeats = "256x512,512x256", "16,64", 1
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = [int(v) for v in args.rows.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; median ms over {args.repeats} runs "
          f"(ratio to bf16 in parentheses: < 1 is faster than bf16)")
    print(header())
    summary = {}
    for in_f, out_f in shapes:
        for r in bench_shape(in_f, out_f, rows, args.repeats, not args.no_fake):
            summary.setdefault(r["M"], []).append(r)
    print("\nW8A8 kernel speedup over bf16 (bf16 time / W8A8 time, all shapes summed):")
    for m, rs in summary.items():
        bf16 = sum(r["bf16"] for r in rs)
        print(f"  M {m:>5}: W8A8 {bf16 / sum(r['w8a8 bf16'] for r in rs):.2f}x, "
              f"int8 GEMM alone {bf16 / sum(r['int8 gemm'] for r in rs):.2f}x, "
              f"W4A16 {bf16 / sum(r['w4a16'] for r in rs):.2f}x")


if __name__ == "__main__":
    main()
