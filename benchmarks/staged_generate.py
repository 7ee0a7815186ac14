"""Staged precision at inference (dllmq.quant.staged): speed and memory of pure full precision, pure low-bit
and staged generation, and optionally what staging does to accuracy.

A configuration is ``LOW`` or ``LOW+HIGH:WHERE=FRACTION``: ``fp``, ``w4a16`` (RTN W4A16 g128), ``w8a8`` (RTN
W8A8, per-channel weights, per-token activations), ``w4a4`` (RTN W4A4, per-channel) or ``w3a16`` (RTN W3A16
g128) alone, or staged: ``w4a16+fp:first=0.25`` runs the first quarter of the steps with the full-precision
weights and the rest with W4A16 (both resident). Quantized layers run on the kernel backend (``--backend``).

    python benchmarks/staged_generate.py                          # dllmq-tiny on the CPU, 1 thread, CPU time
    python benchmarks/staged_generate.py --device cuda            # a ~1B random LLaDA on a GPU (< 60 s on an H200)
    python benchmarks/staged_generate.py --accuracy               # + mini_math (--limit 20) on dllmq-tiny-instruct
    python benchmarks/staged_generate.py --dry-run                # the CUDA run's steps on the CPU at toy sizes

Speed: generated tokens per second of CPU time on the CPU (one thread; a warm-up generation first), of wall
time on CUDA (synchronized). Memory: "weights" is every distinct tensor the model holds (both precisions of a
staged model's switched modules, everything else once); "peak" is on the CPU the process's peak RSS during
generation (each configuration in its own process, the peak reset after the model is built), on CUDA
torch.cuda.max_memory_allocated during generation minus what other configurations' leftovers held before
this one was built (all configurations share one process there, to fit the minute).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

LOWS = {"fp": None,
        "w4a16": dict(method="rtn", wbits=4, group_size=128),
        "w3a16": dict(method="rtn", wbits=3, group_size=128),
        "w8a8": dict(method="rtn", wbits=8, abits=8),
        "w4a4": dict(method="rtn", wbits=4, abits=4)}
CPU_CONFIGS = ["fp", "w4a16", "w8a8", "w4a16+fp:first=0.25", "w4a16+fp:first=0.5", "w4a16+fp:last=0.25",
               "w4a16+w8a8:first=0.25", "w4a16+w8a8:first=0.5"]
# On CUDA the weight-only W4A16 layers may run fake quantization (the table lists each layer's kernel).
CUDA_CONFIGS = ["fp", "w8a8", "w4a4", "w4a16", "w4a4+w8a8:first=0.25", "w4a4+w8a8:first=0.5", "w4a4+fp:first=0.25",
                "w4a16+fp:first=0.25"]
ACCURACY_CONFIGS = ["fp", "w3a16", "w3a16+fp:first=0.25", "w3a16+fp:first=0.5", "w3a16+fp:last=0.25"]
# The ~1B random LLaDA of benchmarks/gpu_check.py (LLaDA-8B's config scaled down).
MODEL_1B = dict(d_model=2048, n_heads=16, n_kv_heads=16, mlp_hidden_size=5632, n_layers=20)


def split(config: str) -> tuple[str, str | None]:
    low, _, spec = config.partition("+")
    if low not in LOWS:
        raise SystemExit(f"error: unknown low side {low!r} in {config!r}; use one of {', '.join(LOWS)}.")
    return low, spec or None


def source_model(name: str, device: str, dtype: torch.dtype):
    """(full-precision model, tokenizer) on the device."""
    if name == "random-1b":
        from dllmq.models.random_models import random_model
        model, tok = random_model("random-llada", seed=0, max_sequence_length=4096, **MODEL_1B)
    else:
        from dllmq.api import load_model
        model, tok, _ = load_model(name, dtype="float32")
    return model.to(device=device, dtype=dtype).eval(), tok


def build(config: str, fp, tok, backend: str, device: str):
    """The configuration's model from (a copy of) the full-precision one."""
    from dllmq.quant import QuantConfig, quantize
    from dllmq.quant.backend import set_backend
    from dllmq.quant.staged import staged_from_fp
    low, spec = split(config)
    fp = copy.deepcopy(fp)
    if spec is not None:
        return staged_from_fp(fp, tok, QuantConfig(**LOWS[low]), spec, backend=backend, device=device)
    if LOWS[low] is not None:
        quantize(fp, tok, QuantConfig(**LOWS[low]), device=device, progress=False)
        set_backend(fp, backend)
    return fp


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def clock(device: str) -> float:
    return time.perf_counter() if device.startswith("cuda") else time.process_time()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        try:   # Linux: writing 5 resets the process's peak RSS (VmHWM) to its current RSS
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def measure(config: str, fp, tok, args) -> dict:
    """Build one configuration and time its generation; returns the row."""
    from dllmq.bench import model_bytes, peak_rss_bytes
    from dllmq.diffusion import generate
    from dllmq.quant.backend import backend_report
    cuda = args.device.startswith("cuda")
    before = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    model = build(config, fp, tok, args.backend, args.device)
    build_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, min(model.config.vocab_size, 256), (1, args.prompt), generator=gen).to(args.device)
    settings = dict(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length or args.gen_length)
    staged = getattr(model, "staged", None)
    with torch.inference_mode():
        generate(model, tok, prompt, **{**settings, "steps": min(args.steps, 2 * (args.gen_length // (
            args.block_length or args.gen_length)))})   # warm-up: kernels' scratch and lazy tables
        gc.collect()
        reset_peak(args.device)
        times = []
        for _ in range(args.repeats):
            sync(args.device)
            t0 = clock(args.device)
            generate(model, tok, prompt, **settings)
            sync(args.device)
            times.append(clock(args.device) - t0)
    row = dict(config=config, seconds=min(times), tokens_per_s=args.gen_length / min(times),
               weights_bytes=model_bytes(model), build_s=build_s,
               peak_bytes=(torch.cuda.max_memory_allocated() - before) if cuda else peak_rss_bytes(),
               kernels=backend_report(model).summary(),
               high_steps=len(staged.spec.high_steps(args.steps)) if staged else None,
               switched=len(staged.switched) if staged else 0)
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def accuracy(config: str, fp, tok, args) -> dict:
    from dllmq.evaluate.mini import evaluate_mini
    model = build(config, fp, tok, args.backend, args.device)
    t0 = time.process_time()
    result = evaluate_mini(model, tok, "mini_math", limit=args.limit, progress=False, return_samples=True)["mini_math"]
    return dict(config=config, acc=result["acc"], stderr=result["stderr"], n=result["n"],
                outputs=[sample["output"] for sample in result["samples"]], cpu_s=time.process_time() - t0)


def run_child(config: str, args) -> dict:
    """One CPU configuration in a fresh process, so its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--child", config, "--model", args.model, "--device", args.device,
           "--backend", args.backend, "--prompt", str(args.prompt), "--gen-length", str(args.gen_length),
           "--steps", str(args.steps), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    if args.block_length:
        cmd += ["--block-length", str(args.block_length)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return dict(config=config, error=proc.stderr.strip().splitlines()[-1:] or ["failed"])
    return json.loads(lines[-1].removeprefix("RESULT "))


def show(row: dict, base: dict | None, device: str) -> None:
    if "error" in row:
        print(f"{row['config']:<24} failed: {row['error']}", flush=True)
        return
    rel = f"{row['tokens_per_s'] / base['tokens_per_s']:5.2f}x" if base else "     "
    high = "" if row["high_steps"] is None else f"  {row['high_steps']} high steps, {row['switched']} switched modules"
    peak = "peak RSS" if device == "cpu" else "peak alloc"
    print(f"{row['config']:<24} {row['tokens_per_s']:8.1f} tok/s {rel}  weights {row['weights_bytes'] / 2**20:8.1f} MiB"
          f"  {peak} {row['peak_bytes'] / 2**20:8.1f} MiB  [{row['kernels']}]{high}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None, help="dllmq-tiny on the CPU, random-1b on CUDA (default)")
    p.add_argument("--configs", default=None, help="comma-separated configurations (see above)")
    p.add_argument("--backend", default="kernel", choices=("kernel", "fake"))
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 64 on the CPU, 256 on CUDA)")
    p.add_argument("--gen-length", type=int, default=None, help="new tokens (default 64 on the CPU, 256 on CUDA)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 16 on the CPU, 32 on CUDA)")
    p.add_argument("--block-length", type=int, default=None, help="LLaDA block length (default: one block)")
    p.add_argument("--repeats", type=int, default=2, help="timed generations per configuration (the fastest counts)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--accuracy", action="store_true", help="also mini_math at --limit on dllmq-tiny-instruct (CPU)")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--in-process", action="store_true",
                   help="every configuration in this process (always so on CUDA; on the CPU it checks that path)")
    p.add_argument("--dry-run", action="store_true",
                   help="the CUDA configurations in one process on the CPU, small random LLaDA (checks the script)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.dry_run:
        args.device, args.in_process, args.model = "cpu", True, "random-llada"
        args.prompt, args.gen_length, args.steps, args.repeats = 8, 8, 4, 1
        args.configs = args.configs or ",".join(CUDA_CONFIGS)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU here; leave --device out to run on the CPU.")
    args.model = args.model or ("random-1b" if cuda else "dllmq-tiny")
    args.prompt = args.prompt or (256 if cuda else 64)
    args.gen_length = args.gen_length or (256 if cuda else 64)
    args.steps = args.steps or (32 if cuda else 16)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.child:
        fp, tok = source_model(args.model, args.device, dtype)
        print("RESULT " + json.dumps(measure(args.child, fp, tok, args)), flush=True)
        return

    configs = args.configs.split(",") if args.configs else (CUDA_CONFIGS if cuda else CPU_CONFIGS)
    for config in configs:
        split(config)
    start = time.perf_counter()
    print(f"{args.model} on {torch.cuda.get_device_name() if cuda else 'cpu'}: {args.prompt} prompt + "
          f"{args.gen_length} new tokens, {args.steps} steps, backend {args.backend}, "
          f"{'wall' if cuda else f'CPU time, {args.threads} thread(s)'}", flush=True)
    rows = []
    fp = tok = None
    in_process = cuda or args.in_process
    if in_process:
        fp, tok = source_model(args.model, args.device, dtype)
        print(f"built the model in {time.perf_counter() - start:.1f} s", flush=True)
    for config in configs:
        try:
            row = measure(config, fp, tok, args) if in_process else run_child(config, args)
        except Exception as e:   # a failing configuration (out of memory, say) is reported, the rest still run
            row = dict(config=config, error=f"{type(e).__name__}: {e}")
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        rows.append(row)
        show(row, rows[0] if "error" not in rows[0] else None, args.device)
    print(f"{time.perf_counter() - start:.0f} s in all", flush=True)
    failed = any("error" in row for row in rows)
    acc_rows = []
    if args.accuracy:
        fp, tok = source_model("dllmq-tiny-instruct", "cpu", torch.float32)
        print(f"\nmini_math --limit {args.limit} on dllmq-tiny-instruct (8 tokens, 8 steps, blocks of 4), "
              f"backend {args.backend}:", flush=True)
        for config in ACCURACY_CONFIGS:
            r = accuracy(config, fp, tok, args)
            acc_rows.append(r)
            # the share of items whose generated text is the full-precision model's: finer than accuracy
            same = sum(a == b for a, b in zip(r["outputs"], acc_rows[0]["outputs"])) / max(len(r["outputs"]), 1)
            r["same_as_fp"] = same
            print(f"{config:<24} acc {r['acc']:.3f} ± {r['stderr']:.3f} (n {r['n']})  same output as fp {same:.3f}  "
                  f"{r['cpu_s']:.1f} s CPU", flush=True)
    if args.json:
        from dllmq.atomic import write_text_atomic
        write_text_atomic(args.json, json.dumps({"args": vars(args), "rows": rows, "accuracy": acc_rows}, indent=2))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
