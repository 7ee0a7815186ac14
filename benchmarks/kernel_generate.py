"""End-to-end diffusion generation: tokens/s and memory, full precision vs quantized backends.

Builds a random LLaDA of about 1B parameters (the LLaDA-8B config scaled down: d_model 2048, 16
heads, FFN 5632, 20 layers; the byte-level test vocabulary, so nearly all weights are in the
blocks), saves it once in bf16 and RTN-quantized as W8A8 (per-channel weights, per-token
activations) and W4A16-g128, then runs each configuration in its own process (so peak memory is
its own) with the same random prompt, generation length and step count:

    fp32, bf16                      the full-precision model
    w8a8 / w4a16 (kernel)           quantized, real integer kernels, bf16 elsewhere
    w8a8-fake / w4a16-fake          quantized, fake quantization (the reference), bf16 elsewhere

    python benchmarks/kernel_generate.py                        # ~1B; seq 512 = 256 prompt + 256 new; 8 steps
    python benchmarks/kernel_generate.py --size tiny --steps 2        # smoke test (random-llada shapes)
    python benchmarks/kernel_generate.py --model dllmq-tiny           # a real (trained) model instead of random 1B
    python benchmarks/kernel_generate.py --configs bf16,w8a8 --workdir /tmp/kg

Weights at rest are the safetensors bytes; in memory, the bytes of every parameter and buffer
after loading (kernel layers hold integer codes, scales and zeros only); peak RSS is what the OS
saw for the whole process, loading included.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = {
    "1b": dict(d_model=2048, n_heads=16, n_kv_heads=16, mlp_hidden_size=5632, n_layers=20, max_sequence_length=4096),
    "tiny": {},
}
QUANT = {"w8a8": dict(method="rtn", wbits=8, abits=8), "w4a16": dict(method="rtn", wbits=4, group_size=128)}
CONFIGS = ["fp32", "bf16", "w8a8", "w4a16", "w8a8-fake", "w4a16-fake"]


def prepare(workdir: Path, size: str, model_name: str | None) -> dict[str, Path]:
    """The bf16 checkpoint and the two quantized ones (reused when already in workdir)."""
    from dllmq.api import load_model
    from dllmq.models.loading import save_model
    from dllmq.models.random_models import random_model
    from dllmq.quant import QuantConfig, quantize, save_quantized

    tag = model_name or f"random-llada-{size}"
    dirs = {"fp": workdir / f"{tag}-bf16", **{q: workdir / f"{tag}-{q}" for q in QUANT}}
    if all(d.exists() for d in dirs.values()):
        return dirs

    def fresh():
        if model_name:
            return load_model(model_name, dtype="float32")[:2]
        return random_model("random-llada", seed=0, **SIZES[size])

    if not dirs["fp"].exists():
        model, tok = fresh()
        save_model(model.to(torch.bfloat16), tok, dirs["fp"])
        print(f"saved {dirs['fp']}", flush=True)
    for q, settings in QUANT.items():
        if dirs[q].exists():
            continue
        model, tok = fresh()
        start = time.perf_counter()
        quantize(model, tok, QuantConfig(**settings), progress=True)
        save_quantized(model.to(torch.bfloat16), tok, dirs[q])
        print(f"quantized {q} in {time.perf_counter() - start:.0f} s -> {dirs[q]}", flush=True)
    return dirs


def child(config: str, path: Path, args) -> dict:
    """One configuration, measured in this (fresh) process."""
    from dllmq.api import load_model
    from dllmq.bench import bench_model

    dtype = "float32" if config == "fp32" else "bfloat16"
    backend = "fake" if config.endswith("-fake") else "kernel"
    model, tok, _ = load_model(path, dtype=dtype, backend=backend)
    result = bench_model(model, tok, name=config, seq_len=args.seq_len, gen_length=args.gen_length,
                         steps=args.steps, repeats=args.repeats, seed=0)
    out = result.__dict__.copy()
    out["params"] = sum(p.numel() for p in model.parameters())
    linear_params = sum(m.in_features * m.out_features for m in model.modules() if hasattr(m, "in_features")
                        and m is not model.get_lm_head())
    out["block_linear_params"] = linear_params
    return out


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1b", choices=list(SIZES))
    p.add_argument("--model", default=None, help="a model name or directory instead of the random one")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="timed forward passes per configuration")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", default=None, help="where checkpoints are kept (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write all results to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, Path(args.path), args)), flush=True)
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kernel_generate_"))
    workdir.mkdir(parents=True, exist_ok=True)
    dirs = prepare(workdir, args.size, args.model)
    results = {}
    for config in args.configs.split(","):
        path = dirs["fp"] if config in ("fp32", "bf16") else dirs[config.removesuffix("-fake")]
        cmd = [sys.executable, __file__, "--child", config, "--path", str(path), "--seq-len", str(args.seq_len),
               "--gen-length", str(args.gen_length), "--steps", str(args.steps), "--repeats", str(args.repeats)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{config}: failed\n{proc.stderr[-2000:]}")
            continue
        r = results[config] = json.loads(lines[-1].removeprefix("RESULT "))
        print(f"{config:<11} forward {r['forward_ms']:9.1f} ms  {r['step_ms']:9.1f} ms/step  "
              f"{r['tokens_per_s']:7.2f} tok/s  weights {r['model_bytes'] / 2**20:8.1f} MiB  "
              f"peak RSS {r['peak_rss_bytes'] / 2**20:8.1f} MiB  "
              f"private RSS after {r['anon_rss_bytes'] / 2**20:8.1f} MiB  "
              f"kernels: {r['kernel_summary']}", flush=True)
    if not results:
        return
    any_r = next(iter(results.values()))
    print(f"\nmodel: {any_r['params'] / 1e9:.3f} B parameters; seq {args.seq_len} = {args.seq_len - args.gen_length} "
          f"prompt + {args.gen_length} generated, {args.steps} steps, {any_r['threads']} threads")
    base = results.get("bf16")
    if base:
        print(f"{'config':<11} {'tok/s':>8} {'vs bf16':>8} {'fwd ms':>9} {'vs bf16':>8} {'weights':>10} {'vs bf16':>8}")
        for config, r in results.items():
            print(f"{config:<11} {r['tokens_per_s']:8.2f} {r['tokens_per_s'] / base['tokens_per_s']:7.2f}x "
                  f"{r['forward_ms']:9.1f} {base['forward_ms'] / r['forward_ms']:7.2f}x "
                  f"{r['model_bytes'] / 2**20:8.1f}Mi {r['model_bytes'] / base['model_bytes']:7.3f}x")
    rest = {name: directory_bytes(d) for name, d in dirs.items()}
    print("weights at rest (safetensors): " + ", ".join(
        f"{name} {b / 2**20:.1f} MiB ({b / rest['fp']:.3f}x bf16)" for name, b in rest.items()))
    if "w4a16" in results and base:
        q, b = results["w4a16"]["quant_weight_bytes"], 2 * results["w4a16"]["block_linear_params"]
        print(f"W4A16 block linears in memory: {q / 2**20:.1f} MiB = {q / b:.3f}x their bf16 size")
    if args.json:
        from dllmq.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps({"args": vars(args), "results": results, "at_rest": rest}, indent=2))


if __name__ == "__main__":
    main()
