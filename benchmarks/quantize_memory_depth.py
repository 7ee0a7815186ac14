"""Peak memory of block-by-block quantization as the model gets deeper.

Quantizes random LLaDA models of 4, 8 and 16 blocks (hidden 512, FFN 1536) with GPTQ in fresh
processes and prints peak RSS above the loaded model: if calibration really holds one block at a
time, that overhead stays flat while the weights grow.

    python benchmarks/quantize_memory_depth.py [--depths 4 8 16 --method gptq --nsamples 16 --seqlen 256]
"""
import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
from dllmq.models.random_models import random_model
from dllmq.quant import QuantConfig, quantize
depth, hidden, method, nsamples, seqlen = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
model, tok = random_model("random-llada", n_layers=depth, d_model=hidden, mlp_hidden_size=3 * hidden,
                          n_heads=hidden // 64, n_kv_heads=hidden // 64)
weights = sum(p.numel() * p.element_size() for p in model.parameters())
from dllmq.data import calibration_set
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
calibration_set(tok, "wiki", nsamples, seqlen, 0)  # tokenizer warm-up outside the measurement
open("/proc/self/clear_refs", "w").write("5")     # reset the peak (VmHWM) to the current RSS
base = status("VmRSS:")
start = time.perf_counter()
quantize(model, tok, QuantConfig(method=method, wbits=4, group_size=128, nsamples=nsamples, seqlen=seqlen), progress=False)
peak = status("VmHWM:")
print(json.dumps({"weights": weights, "base": base, "peak": peak, "seconds": time.perf_counter() - start}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--method", default="gptq")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    args = p.parse_args()
    print(f"{args.method}, hidden {args.hidden}, {args.nsamples} x {args.seqlen} calibration tokens, CPU")
    print(f"{'blocks':>6} {'fp32 weights':>13} {'peak RSS':>10} {'peak - before':>14} {'s/block':>8}")
    for depth in args.depths:
        r = json.loads(subprocess.run([sys.executable, "-c", CHILD, str(depth), str(args.hidden), args.method,
                                       str(args.nsamples), str(args.seqlen)],
                                      check=True, capture_output=True, text=True).stdout)
        mib = 2 ** 20
        print(f"{depth:>6} {r['weights'] / mib:>10.0f} MiB {r['peak'] / mib:>6.0f} MiB {(r['peak'] - r['base']) / mib:>10.0f} MiB"
              f" {r['seconds'] / depth:>8.2f}")


if __name__ == "__main__":
    main()
