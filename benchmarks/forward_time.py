"""Forward-pass time of the built-in models at a given sequence length (CPU by default).

    python benchmarks/forward_time.py --model random-llada --seq-len 512 --repeats 10
"""
import argparse
import statistics
import time

import torch

from dllmq import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random-llada")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()

    model, _, _ = load_model(args.model, dtype=args.dtype)
    ids = torch.randint(0, 256, (args.batch, args.seq_len))
    times = []
    with torch.inference_mode():
        model(ids)  # warm-up
        for _ in range(args.repeats):
            start = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - start)
    n = sum(p.numel() for p in model.parameters())
    print(f"model {args.model} ({n:,} params, {args.dtype}), batch {args.batch} x seq {args.seq_len}, "
          f"{torch.get_num_threads()} threads")
    print(f"forward: median {1e3 * statistics.median(times):.2f} ms, min {1e3 * min(times):.2f} ms "
          f"over {args.repeats} runs")


if __name__ == "__main__":
    main()
