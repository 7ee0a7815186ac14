"""Weight-activation quantization of a real pretrained model: SmolLM2-135M-Instruct.

Perplexity on dllmq's held-out offline Wikipedia text for FP and, at W8A8 and W4A4: RTN (no
transform), SmoothQuant, QuaRot with RTN and with GPTQ weights, DuQuant — all calibrated on the same
windows of the train split; the transform + quantization cost (seconds, peak RSS); and where the
largest activation outliers sit (max |x| of each linear's input as its weight sees it) before and
after each method. SmolLM2's 4-bit GGUF weight grid does not affect activations.

    python benchmarks/weight_activation_smollm2.py [--nsamples 16 --seqlen 512 --eval-windows 40]
"""
import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
from dllmq import load_model
from dllmq.data import calibration_set, eval_token_ids
from dllmq.diffusion import perplexity
from dllmq.models.smollm2 import smollm2_checkpoint
from dllmq.quant import QuantConfig, quantize
from dllmq.quant.online import seen_input
method, wm, bits, nsamples, seqlen, windows, eval_len = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
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
    quantize(model, tok, QuantConfig(method=method, wbits=bits, abits=bits, weight_method=wm, nsamples=nsamples,
                                     seqlen=seqlen), progress=False)
    seconds = time.perf_counter() - start
peak = status("VmHWM:") - base
# outliers: max |x| of every block linear's input, as its weight sees it (before activation quantization)
maxima = {}
hooks = []
for i, block in enumerate(model.get_blocks()):
    for name in model.family.block_linears:
        mod = block.get_submodule(name)
        hooks.append(mod.register_forward_hook(lambda m, a, o, key=f"{i}.{name}": maxima.__setitem__(
            key, max(maxima.get(key, 0.0), seen_input(m, a[0]).abs().max().item()))))
ids = eval_token_ids(tok, "wiki")
with torch.inference_mode():
    model(ids[None, :eval_len])
for h in hooks:
    h.remove()
with torch.inference_mode():
    ppl = perplexity(model, ids, seqlen=eval_len, max_windows=windows, batch_size=1, progress=False).ppl
top = sorted(maxima.items(), key=lambda kv: -kv[1])[:3]
print(json.dumps({"ppl": ppl, "seconds": seconds, "peak": peak, "top": top}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--eval-seqlen", type=int, default=512)
    args = p.parse_args()

    def run(method, weight_method="gptq", bits=16):
        out = subprocess.run([sys.executable, "-c", CHILD, method, weight_method, str(bits), str(args.nsamples),
                              str(args.seqlen), str(args.eval_windows), str(args.eval_seqlen)],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    def top(r):
        return ", ".join(f"{k} {v:.0f}" for k, v in r["top"])

    print(f"SmolLM2-135M-Instruct, held-out wiki perplexity ({args.eval_windows} x {args.eval_seqlen} tokens), "
          f"calibration {args.nsamples} x {args.seqlen} tokens, CPU fp32, per-channel weights, per-token activations")
    fp = run("fp")
    print(f"{'config':<24} {'ppl':>9} {'vs FP':>9} {'time s':>7} {'peak MiB':>9}  largest input max|x| (block.linear)")
    print(f"{'FP':<24} {fp['ppl']:>9.3f} {'':>9} {'':>7} {'':>9}  {top(fp)}")
    for bits in args.bits:
        for label, method, wm in [("RTN", "rtn", "gptq"), ("SmoothQuant", "smoothquant", "gptq"),
                                  ("QuaRot-RTN", "quarot", "rtn"), ("QuaRot-GPTQ", "quarot", "gptq"),
                                  ("DuQuant", "duquant", "gptq")]:
            r = run(method, wm, bits)
            print(f"{label + f' W{bits}A{bits}':<24} {r['ppl']:>9.3f} {r['ppl'] - fp['ppl']:>+9.3f} "
                  f"{r['seconds']:>7.1f} {r['peak'] / 2**20:>9.0f}  {top(r)}", flush=True)


if __name__ == "__main__":
    main()
