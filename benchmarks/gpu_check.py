"""The prepared GPU check: every CUDA code path of dllmq exercised once, one table printed.

Run it once on a machine with an NVIDIA GPU (about 4-6 minutes on one H100/H200):

    python benchmarks/gpu_check.py                 # on cuda
    python benchmarks/gpu_check.py --dry-run       # the same steps on the CPU at toy sizes (CI runs this)
    python benchmarks/gpu_check.py --only kernels  # one section: calibration, kernels, generation, evaluation,
                                                   # profile

Sections (each row: what ran, the number it measured, PASS / FAIL where there is a reference):
1. calibration on the device: GPTQ W4A16-g128, AWQ W4A16-g128 and QuaRot W4A4 on two LLaDA-8B-shaped
   blocks (d_model 4096, 32 heads, FFN 12288; random weights, bf16), weights kept on the CPU and one
   block at a time on the GPU: seconds, peak device memory, and PASS when every quantized output is finite;
2. kernel vs fake quantization at LLaDA-8B layer shapes (4096x4096, 4096x12288, 12288x4096): int8 W8A8
   (torch._int_mm), int4 W4A16 and int8 W8A16 (weight-only: the packed weight dequantized per call into
   a dense GEMM) and FP8 W8A8 (torch._scaled_mm, row-wise scales;
   on the dry run's CPU it has no kernel and only the fake path is timed), max |kernel - fake| / max
   |fake| against a bf16 tolerance, and each path's time per call;
3. generation tokens/s on a ~1B random LLaDA (256 prompt + 256 new tokens, 32 steps): bf16, W8A8,
   W4A16 and W8A8-fp8 on real kernels;
4. evaluation cost per item on the same model: one Monte Carlo likelihood item (mc_num 128) and one
   generation item (256 tokens, 256 steps, blocks of 32), as the study's presets run them;
5. profile of one denoising step (one forward over the 512 tokens) of the W8A8 and W4A16 kernel models
   under torch.profiler: the top 12 ops by self GPU time are printed, and the row gives the step's time,
   its kernel launches, its host syncs (cudaStreamSynchronize / cudaDeviceSynchronize) and its value
   read-backs (aten::_local_scalar_dense: item(), bool(tensor)); then the kernel model's logits against
   the same model on fake quantization (PASS within 0.15 relative; a CPU bf16 20-block model gives 3e-2
   for W8A8 and 0 for W4A16, while a wrong activation grid or packed layout would be off by about 1).
A step that fails prints its error in the table and the script goes on; the exit code is 1 when any
row failed. Nothing is written to disk except the table on stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
import traceback

import torch

from dllmq.diffusion import llada_generate, mc_loglikelihood
from dllmq.models.random_models import random_model
from dllmq.quant import QuantConfig, QuantLinear, quantize
from dllmq.quant.activations import ActQuantizer
from dllmq.quant.backend import choose_kernel, set_backend, to_kernel
from dllmq.quant.formats import FORMATS, quantize_weight
from dllmq.quant.qlinear_fp import FPQuantLinear
from dllmq.quant.primitives import QuantSpec, compute_qparams

# LLaDA-8B block shapes, and a ~1B model (the 8B config scaled down) for generation and evaluation.
BLOCK_8B = dict(d_model=4096, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288, n_layers=2)
MODEL_1B = dict(d_model=2048, n_heads=16, n_kv_heads=16, mlp_hidden_size=5632, n_layers=20)
LAYERS_8B = ((4096, 4096), (12288, 4096), (4096, 12288))             # (out, in)
# The same steps at toy sizes for --dry-run on the CPU.
BLOCK_TOY = dict(d_model=128, n_heads=4, n_kv_heads=4, mlp_hidden_size=256, n_layers=2)
MODEL_TOY = dict(d_model=128, n_heads=4, n_kv_heads=4, mlp_hidden_size=256, n_layers=2)
LAYERS_TOY = ((256, 128), (128, 256))
TOLERANCE = 2e-2     # max |kernel - fake| / max |fake| in bf16 (fp32 on the CPU: the kernels are exact there)
SECTIONS = ("calibration", "kernels", "generation", "evaluation", "profile")
PROFILED = {"W8A8 kernel": dict(wbits=8, abits=8), "W4A16-g128 kernel": dict(wbits=4, group_size=128)}
# Host-side events that wait for the GPU (or read a value back, which waits for it)
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
READ_EVENTS = ("aten::_local_scalar_dense",)   # every value read back (item(), bool(t), int(t)) goes through it
LAUNCH_EVENTS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
MODEL_TOLERANCE = 0.15  # whole-model logits, kernel vs fake in bf16 (W8A8 measured 3.0e-2 on a 20-block CPU model)


class Table:
    def __init__(self):
        self.rows: list[tuple[str, str, str]] = []

    def add(self, check: str, value: str, status: str = "") -> None:
        self.rows.append((check, value, status))
        print(f"  {check:<44} {value:<46} {status}", flush=True)

    @property
    def failed(self) -> bool:
        return any(status == "FAIL" for _, _, status in self.rows)

    def render(self) -> str:
        widths = [max(len(r[i]) for r in self.rows + [("check", "measured", "result")]) for i in range(3)]
        line = "| " + " | ".join(h.ljust(w) for h, w in zip(("check", "measured", "result"), widths)) + " |"
        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        body = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in self.rows]
        return "\n".join([line, rule, *body])


@contextlib.contextmanager
def step(table: Table, check: str):
    """Run a step; an exception becomes a FAIL row instead of ending the script."""
    try:
        yield
    except Exception as err:  # the point is to report every failure, whatever its type
        traceback.print_exc(file=sys.stderr)
        table.add(check, f"{type(err).__name__}: {str(err)[:40]}", "FAIL")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int = 3) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_memory(device: str) -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB peak" if device == "cuda" else "cpu"


def check_calibration(table: Table, device: str, shapes: dict, dtype: torch.dtype, nsamples: int, seqlen: int):
    runs = {"GPTQ W4A16-g128": dict(method="gptq", wbits=4, group_size=128),
            "AWQ W4A16-g128": dict(method="awq", wbits=4, group_size=128),
            "QuaRot W4A4 (GPTQ weights)": dict(method="quarot", wbits=4, abits=4)}
    for label, settings in runs.items():
        check = f"calibration {label}"
        with step(table, check):
            model, tok = random_model("random-llada", seed=0, dtype=dtype, **shapes)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            config = QuantConfig(**settings, nsamples=nsamples, seqlen=seqlen)
            start = time.perf_counter()
            report = quantize(model, tok, config, device=device, progress=False)
            seconds = time.perf_counter() - start
            ids = torch.randint(0, 200, (1, seqlen), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                finite = bool(torch.isfinite(model.to(device)(ids.to(device)).float()).all())
            errors = [layer.error for layer in report.layers]
            ok = finite and all(math.isfinite(e) for e in errors)
            table.add(check, f"{seconds:.1f} s, {peak_memory(device)}, mean error {sum(errors) / len(errors):.3f}",
                      "PASS" if ok else "FAIL")
            del model


def quant_linear(out_f: int, in_f: int, bits: int, group: int, act_bits: int | None, device: str,
                 dtype: torch.dtype) -> QuantLinear:
    """An RTN-quantized random linear (asymmetric), optionally with a per-token activation quantizer."""
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(out_f + in_f)) * 0.02
    spec = QuantSpec(bits=bits, granularity="channel") if group == -1 else \
        QuantSpec(bits=bits, granularity="group", group_size=group)
    scale, zero = compute_qparams(w, spec)
    if group == -1:
        scale, zero = scale.reshape(-1, 1), zero.reshape(-1, 1)
    linear = torch.nn.Linear(in_f, out_f, bias=False)
    linear.weight.data = w
    q = QuantLinear.from_float(linear, scale, zero, bits, group)
    if act_bits is not None:
        q.act_quantizer = ActQuantizer(act_bits)
    return q.to(device=device, dtype=dtype)


def fp8_linear(out_f: int, in_f: int, device: str) -> FPQuantLinear:
    """A random linear in FP8 E4M3 (per-channel scales) with per-token FP8 activations, as W8A8-fp8 makes it."""
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(out_f + in_f)) * 0.02
    linear = torch.nn.Linear(in_f, out_f, bias=False)
    linear.weight.data = w
    values, scales, _ = quantize_weight(w, FORMATS["fp8"])
    q = FPQuantLinear.from_values(linear, values, scales, "fp8")
    q.act_quantizer = ActQuantizer(8, symmetric=True, format="fp8")
    return q.to(device=device)     # codes stay uint8 and scales float32


def compare_kernel(table: Table, check: str, q, device: str, dtype: torch.dtype, tokens: int, in_f: int,
                   cpu_may_lack: bool = False) -> None:
    choice = choose_kernel(q)
    kernel = to_kernel(q, choice)
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    if kernel is None:
        if cpu_may_lack and device == "cpu":   # the FP8 kernel needs a GPU: the dry run times the fake path only
            with torch.no_grad():
                t_fake = timed(lambda: q(x), device)
            table.add(check, f"fake only here ({choice.reason}); fake {t_fake * 1e3:.2f} ms")
        else:
            table.add(check, f"no kernel: {choice.reason}", "FAIL")
        return
    with torch.no_grad():
        fake, real = q(x).float(), kernel(x).float()
        rel = ((real - fake).abs().max() / fake.abs().max().clamp_min(1e-12)).item()
        t_fake = timed(lambda: q(x), device)
        t_kernel = timed(lambda: kernel(x), device)
    table.add(check, f"{choice.kernel}: rel diff {rel:.1e}, {t_kernel * 1e3:.2f} ms "
                     f"(fake {t_fake * 1e3:.2f} ms)", "PASS" if rel < TOLERANCE else "FAIL")


def check_kernels(table: Table, device: str, layers: tuple, dtype: torch.dtype, tokens: int):
    paths = {"int8 W8A8": dict(bits=8, group=-1, act_bits=8), "int4 W4A16-g128": dict(bits=4, group=128, act_bits=None),
             "int8 W8A16": dict(bits=8, group=-1, act_bits=None)}
    for label, kw in paths.items():
        for out_f, in_f in layers:
            check = f"kernel {label} {out_f}x{in_f}"
            with step(table, check):
                q = quant_linear(out_f, in_f, kw["bits"], min(kw["group"], in_f) if kw["group"] > 0 else -1,
                                 kw["act_bits"], device, dtype)
                compare_kernel(table, check, q, device, dtype, tokens, in_f)
    for out_f, in_f in layers:
        check = f"kernel fp8 W8A8 {out_f}x{in_f}"
        with step(table, check):
            compare_kernel(table, check, fp8_linear(out_f, in_f, device), device, dtype, tokens, in_f,
                           cpu_may_lack=True)


def generation_model(shapes: dict, device: str, dtype: torch.dtype, quant: dict | None):
    model, tok = random_model("random-llada", seed=0, **shapes)
    if quant is not None:
        quantize(model, tok, QuantConfig(method="rtn", **quant), progress=False)
    model = model.to(device=device, dtype=dtype)
    if quant is not None:
        set_backend(model, "kernel")
    return model


def check_generation(table: Table, device: str, shapes: dict, dtype: torch.dtype, prompt: int, new: int, steps: int,
                     keep: dict | None = None):
    configs = {"bf16" if dtype == torch.bfloat16 else "full precision": None,
               "W8A8 kernel": dict(wbits=8, abits=8), "W4A16-g128 kernel": dict(wbits=4, group_size=128),
               "W8A8-fp8 kernel": dict(wformat="fp8", aformat="fp8")}   # fake on the CPU (dry run)
    ids = torch.randint(0, 200, (1, prompt), generator=torch.Generator().manual_seed(2)).to(device)
    for label, quant in configs.items():
        check = f"generation {label}"
        with step(table, check):
            model = generation_model(shapes, device, dtype, quant)
            seconds = timed(lambda: llada_generate(model, ids, gen_length=new, steps=steps, block_length=new), device,
                            repeats=1)
            table.add(check, f"{new / seconds:.1f} tokens/s ({prompt} + {new} tokens, {steps} steps)")
            if keep is not None and label in PROFILED:   # the profile section reuses it
                keep[label] = model


def check_evaluation(table: Table, device: str, shapes: dict, dtype: torch.dtype, answer: int, new: int,
                     steps: int, block: int, mc_num: int):
    with step(table, "evaluation per item"):
        model = generation_model(shapes, device, dtype, None)
        prompt = torch.randint(0, 200, (1, 64), generator=torch.Generator().manual_seed(3)).to(device)
        target = torch.randint(0, 200, (1, answer), generator=torch.Generator().manual_seed(4)).to(device)
        t_like = timed(lambda: mc_loglikelihood(model, prompt, target, mc_num=mc_num, batch_size=32), device, repeats=1)
        t_gen = timed(lambda: llada_generate(model, prompt, gen_length=new, steps=steps, block_length=block), device,
                      repeats=1)
        table.add("evaluation likelihood item", f"{t_like:.2f} s (mc_num {mc_num}, {answer}-token answer)")
        table.add("evaluation generation item", f"{t_gen:.2f} s ({new} tokens, {steps} steps, blocks of {block})")


def _self_time_us(event, device: str) -> float:
    """An averaged profiler event's self time on the device (on the CPU for the dry run), in microseconds."""
    if device != "cuda":
        return event.self_cpu_time_total
    for name in ("self_device_time_total", "self_cuda_time_total"):   # the newer name first
        value = getattr(event, name, None)
        if value is not None:
            return value
    return 0.0


def _event_count(events, names: tuple[str, ...]) -> int:
    return sum(e.count for e in events if e.key in names)


def check_profile(table: Table, device: str, shapes: dict, dtype: torch.dtype, prompt: int, new: int,
                  models: dict):
    from torch.profiler import ProfilerActivity, profile

    for label, quant in PROFILED.items():
        check = f"profile {label} step"
        model = models.pop(label, None)
        with step(table, check):
            if model is None:
                model = generation_model(shapes, device, dtype, quant)
            mask = model.config.mask_token_id
            ids = torch.randint(0, 200, (1, prompt), generator=torch.Generator().manual_seed(2))
            x = torch.cat([ids, torch.full((1, new), mask)], dim=1).to(device)
            with torch.no_grad():
                seconds = timed(lambda: model(x), device, repeats=3)
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
                with profile(activities=activities) as prof:
                    model(x)
                    sync(device)
            events = prof.key_averages()
            top = sorted(events, key=lambda e: _self_time_us(e, device), reverse=True)[:12]
            where = "GPU" if device == "cuda" else "CPU"
            print(f"    top 12 ops by self {where} time, one {label} step ({prompt + new} tokens):", flush=True)
            for e in top:
                print(f"      {e.key[:64]:<64} {_self_time_us(e, device) / 1e3:9.3f} ms {e.count:6d} calls", flush=True)
            syncs, reads = _event_count(events, SYNC_EVENTS), _event_count(events, READ_EVENTS)
            launches = _event_count(events, LAUNCH_EVENTS)
            table.add(check, f"{seconds * 1e3:.1f} ms/step, {launches} launches, {syncs} syncs, {reads} reads")

        check = f"profile {label} logits vs fake"
        with step(table, check):
            if model is None:
                raise RuntimeError("no model: building it failed above")
            with torch.no_grad():
                real = model(x).float()
                set_backend(model, "fake")
                fake = model(x).float()
            rel = ((real - fake).abs().max() / fake.abs().max().clamp_min(1e-12)).item()
            agree = (real.argmax(-1) == fake.argmax(-1)).float().mean().item()
            table.add(check, f"rel diff {rel:.1e}, argmax agrees on {agree:.0%}",
                      "PASS" if rel < MODEL_TOLERANCE else "FAIL")
            model = None   # frees it before the next one is built


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Without a GPU, run --dry-run: the same steps on the CPU at toy sizes.")
    p.add_argument("--dry-run", action="store_true", help="the CPU at toy sizes (seconds): checks the script itself")
    p.add_argument("--only", choices=SECTIONS, action="append", help="run only this section (repeatable)")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA GPU here; run with --dry-run to check the script on the CPU.", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    toy = args.dry_run
    sections = args.only or SECTIONS
    table = Table()
    name = "cpu (dry run)" if toy else torch.cuda.get_device_name()
    print(f"dllmq GPU check on {name}, torch {torch.__version__}", flush=True)
    start = time.perf_counter()
    if "calibration" in sections:
        check_calibration(table, device, BLOCK_TOY if toy else BLOCK_8B, dtype, 2 if toy else 16, 32 if toy else 512)
    if "kernels" in sections:
        check_kernels(table, device, LAYERS_TOY if toy else LAYERS_8B, dtype, 16 if toy else 512)
    models: dict = {}   # generation's W8A8 / W4A16 models, profiled at the end instead of built again
    if "generation" in sections:
        check_generation(table, device, MODEL_TOY if toy else MODEL_1B, dtype, 8 if toy else 256,
                         8 if toy else 256, 2 if toy else 32, keep=models if "profile" in sections else None)
    if "evaluation" in sections:
        check_evaluation(table, device, MODEL_TOY if toy else MODEL_1B, dtype, 4 if toy else 8,
                         8 if toy else 256, 8 if toy else 256, 8 if toy else 32, 4 if toy else 128)
    if "profile" in sections:
        check_profile(table, device, MODEL_TOY if toy else MODEL_1B, dtype, 8 if toy else 256, 8 if toy else 256,
                      models)
    print(f"\n{table.render()}\n\n{time.perf_counter() - start:.0f} s in all", flush=True)
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
