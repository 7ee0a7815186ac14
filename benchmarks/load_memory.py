"""Peak memory of loading a checkpoint, as a ratio to its weight file size.

Saves a mid-size random LLaDA (about 1 GB of float32 weights by default), then loads it in a fresh
process twice: with dllmq's memory-mapped loader, and with safetensors' `load_file` + `load_state_dict`
(the usual copy) for contrast. Each child runs one forward pass so every weight page is really read.

    python benchmarks/load_memory.py [--layers 18 --hidden 1024]
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, torch
from pathlib import Path
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
path, mode = Path(sys.argv[1]), sys.argv[2]
import dllmq  # imports before the baseline
from dllmq.models.loading import load_checkpoint
before = rss_mib()
if mode == "mmap":
    model = load_checkpoint(path, torch.float32)
else:
    from safetensors.torch import load_file
    from dllmq.models.config import read_config_json
    from dllmq.models.registry import build_model, parse_model_config
    with torch.device("meta"):
        model = build_model(parse_model_config(read_config_json(path)))
    model.load_state_dict(load_file(str(path / "model.safetensors")), assign=True)
with torch.inference_mode():
    model(torch.zeros(1, 16, dtype=torch.long))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"before": before, "peak": peak, "after": rss_mib()}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--hidden", type=int, default=1024)
    args = p.parse_args()

    from dllmq import save_model
    from dllmq.models.random_models import random_model

    with tempfile.TemporaryDirectory() as tmp:
        model, tok = random_model("random-llada", d_model=args.hidden, n_layers=args.layers,
                                  mlp_hidden_size=3 * args.hidden, n_heads=args.hidden // 128,
                                  n_kv_heads=args.hidden // 128)
        out = save_model(model, tok, Path(tmp) / "mid")
        del model
        size_mib = (out / "model.safetensors").stat().st_size / 2**20
        print(f"checkpoint: {args.layers} blocks x hidden {args.hidden}, {size_mib:.0f} MiB float32")
        for mode in ("mmap", "copy"):
            res = json.loads(subprocess.run([sys.executable, "-c", CHILD, str(out), mode], check=True,
                                            capture_output=True, text=True).stdout)
            cost = res["peak"] - res["before"]
            print(f"{mode:5s} loader: peak RSS growth {cost:7.0f} MiB = {cost / size_mib:.2f}x the file "
                  f"(resident after load and forward: {res['after'] - res['before']:.0f} MiB)")


if __name__ == "__main__":
    main()
