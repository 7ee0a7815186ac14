"""CPU time of dllmq's calibration on the SmolLM2 protocol (benchmarks/compare_tools_smollm2.py's data), on
one thread (`--threads N`: N, and the wall time too), for a given source tree: to compare two versions of
dllmq on a shared machine, where wall time means little, run it once per tree, one after the other.

    python benchmarks/calib_cpu_time_smollm2.py --src /path/to/old/src --method gptq --bits 4 --group 64
    python benchmarks/calib_cpu_time_smollm2.py --src src --method gptq --bits 4 --group 64

Prints one JSON line: CPU seconds of the quantize call (`time.process_time`), peak RSS above the loaded model,
a hash of every quantized block's weights (equal hashes: identical codes) and, with all blocks, the
perplexity. `--blocks N` quantizes only the first N blocks (a quicker timing; no perplexity).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="the dllmq source tree to time (its src/ folder)")
    p.add_argument("--method", default="gptq", choices=["gptq", "awq", "rtn"])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--blocks", type=int, default=0, help="quantize only the first N blocks (0: all)")
    p.add_argument("--settings", type=json.loads, default={}, help="extra method settings (JSON)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (wall_s is meaningful on quiet cores only)")
    args = p.parse_args()
    src = str(Path(args.src).resolve())
    sys.path.insert(0, src)
    import torch
    torch.set_num_threads(args.threads)
    import dllmq
    if not dllmq.__file__.startswith(src):
        sys.exit(f"dllmq was imported from {dllmq.__file__}, not from {src}")
    from dllmq import load_model
    from dllmq.quant import QuantConfig
    from dllmq.quant.pipeline import quantize_model
    sys.path.insert(1, str(Path(__file__).parent))
    from compare_tools_smollm2 import protocol_data

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = protocol_data(Path(tmp) / "data.pt", 64, 512, 40, 0)
        data = torch.load(Path(tmp) / "data.pt", weights_only=True)
    model, _, _ = load_model(checkpoint, dtype="float32")
    blocks = model.get_blocks()
    if 0 < args.blocks < len(blocks):
        del blocks[args.blocks:]
    calib = data["calib"]
    config = QuantConfig(method=args.method, wbits=args.bits, group_size=args.group, sym=True,
                         nsamples=calib.shape[0], seqlen=calib.shape[1], **args.settings)

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS:")
    start, wall = time.process_time(), time.perf_counter()
    quantize_model(model, config.make_method(), calib if config.needs_calibration else None, progress=False)
    cpu, wall = time.process_time() - start, time.perf_counter() - wall
    peak = (status("VmHWM:") - base) / 2 ** 20
    state = blocks.state_dict()
    digest = hashlib.sha256(b"".join(state[k].detach().float().numpy().tobytes() for k in sorted(state)))
    ppl = None
    if args.blocks == 0:
        import torch.nn.functional as F
        total, count = 0.0, 0
        with torch.no_grad():
            for rows in data["eval"].split(4):
                logits = model(rows)[:, :-1].float()
                total += float(F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum"))
                count += rows[:, 1:].numel()
        ppl = float(torch.exp(torch.tensor(total / count)))
    print(json.dumps(dict(src=src, method=args.method, bits=args.bits, group=args.group, blocks=len(blocks),
                          cpu_s=round(cpu, 2), wall_s=round(wall, 2), threads=args.threads, peak_mib=round(peak),
                          weights_sha256=digest.hexdigest()[:16], ppl=ppl)))


if __name__ == "__main__":
    main()
