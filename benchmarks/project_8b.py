"""Projected cost of block-by-block GPTQ on the real LLaDA-8B and Dream-7B, from their configs.

No GPU and no 8B weights reach this project's machines, so this is arithmetic, printed step by step:
device memory = one block in bf16 + calibration activations in and out + the largest Hessian +
one sample's attention scores and FFN activations; time = matmul FLOPs of the passes GPTQ makes
(4 true-sequential passes + 1 output pass per block, Hessians shared within a group) at an assumed
sustained throughput, plus the column loop's kernel launches.

    python benchmarks/project_8b.py [--nsamples 128 --seqlen 2048 --tflops 100 --launch-us 10]
"""
import argparse

from dllmq.models.config import real_config
from dllmq.models.registry import parse_model_config

GiB = 2 ** 30


def project(name: str, nsamples: int, seqlen: int, tflops: float, launch_us: float) -> None:
    c = parse_model_config(real_config(name))
    h, f, d = c.hidden_size, c.intermediate_size, c.head_dim
    q_out, kv_out = c.n_heads * d, c.n_kv_heads * d
    block_params = h * q_out + 2 * h * kv_out + q_out * h + 3 * h * f + (q_out + 2 * kv_out if c.qkv_bias else 0)
    tokens = nsamples * seqlen
    block_bytes = 2 * block_params
    acts = 2 * tokens * h * 2                     # inputs and outputs of the block, bf16
    hessian = 4 * max(h, f, q_out) ** 2           # float32, the down projection's is the largest
    attn = 2 * c.n_heads * seqlen ** 2            # one sample's attention scores, bf16
    ffn = 2 * 2 * seqlen * f                      # one sample's gate and up outputs
    memory = block_bytes + acts + hessian + attn + ffn
    print(f"{name}: {c.n_layers} blocks, {block_params / 1e6:.0f}M parameters per block, "
          f"calibration {nsamples} x {seqlen} = {tokens:,} tokens")
    print(f"  device memory  block {block_bytes / GiB:.2f} + activations in/out {acts / GiB:.2f} "
          f"+ largest Hessian {hessian / GiB:.2f} + attention {attn / GiB:.2f} + FFN {ffn / GiB:.2f} "
          f"= {memory / GiB:.1f} GiB  (with --offload-activations: {(memory - acts) / GiB:.1f} GiB + transfers)")
    forward = 2 * tokens * block_params + 4 * tokens * seqlen * q_out   # linears + attention matmuls
    hess = 2 * tokens * (h * h + q_out * q_out + h * h + f * f)        # one Hessian per group
    cols = 3 * h + q_out + 2 * h + f                                  # every linear's columns are walked
    solve = sum(2 * n_out * n_in * n_in for n_out, n_in in
                [(q_out, h), (kv_out, h), (kv_out, h), (h, q_out), (f, h), (f, h), (h, f)])
    flops = 5 * forward + hess + solve
    launches = cols * 12 * launch_us * 1e-6
    per_block = flops / (tflops * 1e12) + launches
    print(f"  time per block 5 passes x {forward / 1e12:.1f} TFLOP + Hessians {hess / 1e12:.1f} + solves "
          f"{solve / 1e12:.2f} = {flops / 1e12:.0f} TFLOP -> {flops / (tflops * 1e12):.1f} s at {tflops:g} TFLOP/s, "
          f"+ {cols:,} columns x 12 kernels x {launch_us:g} us = {launches:.1f} s")
    print(f"  whole model    {c.n_layers} x {per_block:.1f} s = {c.n_layers * per_block / 60:.1f} min")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--tflops", type=float, default=100.0, help="sustained bf16 matmul throughput assumed")
    p.add_argument("--launch-us", type=float, default=10.0, help="cost of one small kernel launch")
    args = p.parse_args()
    for name in ("llada-8b", "dream-7b"):
        project(name, args.nsamples, args.seqlen, args.tflops, args.launch_us)


if __name__ == "__main__":
    main()
