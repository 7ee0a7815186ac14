"""Peak memory of loading a quantized model for the kernel backend: today's two steps (load with fake
quantization, then set_backend(model, "kernel")) against the streaming load (load_model(..., backend="kernel"),
each linear converted as its tensors are read), with the bf16 load of the same model as the yardstick.

Uses the checkpoints of benchmarks/kernel_generate.py (a 1.03B-parameter random LLaDA: d_model 2048 x 20
layers, FFN 5632, byte-level vocabulary; saved in bf16, and RTN-quantized as W8A8 and W4A16-g128), made once
in --workdir. Every case runs in a fresh process: import torch and dllmq, note the resident memory, load
(bf16 parameters), run one 16-token forward so every weight page is really read, then report the peak
resident memory (VmHWM) of the whole process, imports included. Ratios are to the bf16 load's peak; the
growth over the imports (peak minus the memory before loading) is printed beside it.

    python benchmarks/streaming_load.py --workdir /tmp/kg              # the ~1B model; about 6 GB RAM to prepare
    python benchmarks/streaming_load.py --size tiny                     # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_generate import SIZES, prepare  # noqa: E402  (the same checkpoints as the speed benchmark)

CASES = {   # name: (checkpoint, how it is loaded)
    "bf16": ("fp", "plain"),
    "w8a8 today": ("w8a8", "two-step"),
    "w8a8 streamed": ("w8a8", "stream"),
    "w4a16 today": ("w4a16", "two-step"),
    "w4a16 streamed": ("w4a16", "stream"),
}

CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
import dllmq
from dllmq.bench import peak_rss_bytes   # VmHWM: ru_maxrss would carry over the parent's peak through exec
from dllmq.quant.backend import set_backend
from transformers import AutoTokenizer  # noqa: F401  (imported by every load; counted before it)

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

path, mode = sys.argv[1], sys.argv[2]
before = rss_mib()
wall, cpu = time.perf_counter(), time.process_time()
if mode == "two-step":
    model = dllmq.load_model(path, dtype="bfloat16", backend="fake").model
    set_backend(model, "kernel")
else:   # "stream" for a quantized checkpoint; "plain" for the bf16 one (the backend changes nothing there)
    model = dllmq.load_model(path, dtype="bfloat16", backend="kernel").model
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
load_peak = peak_rss_bytes() / 2**20
with torch.inference_mode():
    model(torch.zeros(1, 16, dtype=torch.long))
peak = peak_rss_bytes() / 2**20
held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if t is not None)
print("RESULT " + json.dumps({"before": before, "peak": peak, "load_peak": load_peak, "after": rss_mib(), "model_mib": held / 2**20,
                              "load_wall_s": wall, "load_cpu_s": cpu}))
"""


def measure(path: Path, mode: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{mode} load of {path} failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1b", choices=list(SIZES))
    p.add_argument("--workdir", default=None, help="where the checkpoints are kept (default: a temp dir)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    args = p.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="streaming_load_"))
    workdir.mkdir(parents=True, exist_ok=True)
    dirs = prepare(workdir, args.size, None)
    results = {}
    for name in args.cases.split(","):
        checkpoint, mode = CASES[name]
        results[name] = measure(dirs[checkpoint], mode)   # one case at a time: each peak is its own
        print(f"measured {name}", flush=True)
    base = results.get("bf16")
    print(f"{'case':<15} {'peak RSS':>10} {'vs bf16':>8} {'growth':>10} {'vs bf16':>8} {'weights':>9} "
          f"{'load peak':>10} {'after':>9} {'load wall':>10} {'load CPU':>9}")
    for name, r in results.items():
        growth = r["peak"] - r["before"]
        ratio = f"{r['peak'] / base['peak']:.2f}x" if base else "-"
        gratio = f"{growth / (base['peak'] - base['before']):.2f}x" if base else "-"
        print(f"{name:<15} {r['peak']:7.0f} MiB {ratio:>8} {growth:6.0f} MiB {gratio:>8} {r['model_mib']:5.0f} MiB "
              f"{r['load_peak']:6.0f} MiB {r['after']:5.0f} MiB {r['load_wall_s']:8.1f} s {r['load_cpu_s']:7.1f} s")
    print(f"(peak: the process's maximum resident memory, imports included ({next(iter(results.values()))['before']:.0f} MiB "
          "before loading); growth: peak minus that; weights: bytes of the loaded parameters and buffers; "
          "load peak: the peak before the forward; after: resident memory after the forward)")


if __name__ == "__main__":
    main()
