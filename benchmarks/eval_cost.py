"""What evaluation costs: measured per item on random-llada (CPU), and projected for LLaDA-8B.

Part 1 measures, through the lm-eval adapter (dllmq.evaluate.harness.DllmqLM), the wall time of
  - one likelihood item shaped like ARC (4 choices, a 40-token prompt, 8-token answers), for
    mc_num 1 / 8 / 32 / 128 (Monte Carlo batch min(32, mc_num));
  - one generation item (a 64-token prompt) for gen_length 32 / 64 / 128 / 256 with
    steps = gen_length and block_length 32 (LLaDA's semi-autoregressive sampler),
and relates each to the tokens pushed through the model (forward passes x rows x sequence length):
the cost of a masked diffusion model is linear in those, because there is no KV cache - every
Monte Carlo draw and every denoising step runs the whole sequence.

Part 2 projects the study's full grid on LLaDA-8B from FLOPs: a forward pass over T tokens costs
2 * N * T (N = parameters, LM head included) + 4 * layers * T^2 * d_model (attention scores and
values, bidirectional), per task tokens = items x choices x mc_num x (prompt + answer) for
likelihood tasks and items x steps x (prompt + gen_length) for generation tasks, with the test-set
sizes and the assumed average token counts printed below, at an assumed sustained throughput
(--tflops, default 300 TFLOP/s: about 30 % of an H100's dense bf16 peak). Fake-quantized models (all
of the study's weight-activation results) run at bf16 speed, so every grid cell costs the same.

    python benchmarks/eval_cost.py [--threads 1] [--repeats 3] [--tflops 300] [--skip-measure]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

# ------------------------------------------------------------------------------------ part 1
LL_PROMPT, LL_ANSWER, LL_CHOICES = 40, 8, 4
GEN_PROMPT = 64


def _ids(n: int, offset: int = 0) -> list[int]:
    return [97 + (i + offset) % 26 for i in range(n)]  # byte tokens 'a'..'z'


def measure(threads: int, repeats: int) -> None:
    from lm_eval.api.instance import Instance

    import dllmq
    from dllmq.evaluate.harness import DllmqLM

    torch.set_num_threads(threads)
    model, tok, _ = dllmq.load_model("random-llada")
    cfg = model.config
    print(f"random-llada: d_model {cfg.hidden_size}, {cfg.n_layers} layers, vocab {cfg.vocab_size}; "
          f"torch threads {threads}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    prompt = "".join(chr(t) for t in _ids(LL_PROMPT))
    answers = [" " + "".join(chr(t) for t in _ids(LL_ANSWER - 1, 3 * k)) for k in range(LL_CHOICES)]

    def timed(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    print("\nlikelihood item (ARC-like: 4 choices, prompt 40 tokens, answer 8 tokens), greedy flag off:")
    print(f"{'mc_num':>7} {'batch':>6} {'forwards':>9} {'tokens':>9} {'s/item':>9} {'us/token':>9}")
    rows = []
    for mc in (1, 8, 32, 128):
        batch = min(32, mc)
        lm = DllmqLM("random-llada", model=model, tokenizer=tok, mc_num=mc, batch_size=batch, greedy=False,
                     progress=False)
        reqs = [Instance("loglikelihood", {}, (prompt, a), i, metadata=("arc", 0, 1)) for i, a in enumerate(answers)]
        seconds = timed(lambda: lm.loglikelihood(reqs, disable_tqdm=True))
        forwards = LL_CHOICES * (mc // batch)
        tokens = LL_CHOICES * mc * (LL_PROMPT + LL_ANSWER)
        rows.append((mc, seconds, tokens))
        print(f"{mc:>7} {batch:>6} {forwards:>9} {tokens:>9} {seconds:>9.4f} {1e6 * seconds / tokens:>9.2f}")
    r = rows[-1][1] / rows[1][1]
    print(f"mc_num 128 vs 8: {r:.1f}x the time for 16x the tokens "
          "(small batches pay fixed per-forward overhead on a tiny model; an 8B model is compute-bound)")

    print(f"\ngeneration item (prompt {GEN_PROMPT} tokens, steps = gen_length, block_length 32):")
    print(f"{'gen_len':>7} {'steps':>6} {'tokens':>9} {'s/item':>9} {'us/token':>9}")
    grows = []
    for gen in (32, 64, 128, 256):
        lm = DllmqLM("random-llada", model=model, tokenizer=tok, gen_length=gen, steps=gen, block_length=32,
                     progress=False)
        req = [Instance("generate_until", {}, ("".join(chr(t) for t in _ids(GEN_PROMPT)), {"until": []}), 0)]
        seconds = timed(lambda: lm.generate_until(req, disable_tqdm=True))
        tokens = gen * (GEN_PROMPT + gen)
        grows.append((gen, seconds, tokens))
        print(f"{gen:>7} {gen:>6} {tokens:>9} {seconds:>9.4f} {1e6 * seconds / tokens:>9.2f}")
    g = grows[-1][1] / grows[0][1]
    print(f"gen_length 256 vs 32: {g:.1f}x the time ({grows[-1][2] / grows[0][2]:.0f}x the tokens: steps grow "
          "with gen_length and every step runs prompt + gen_length tokens, so cost ~ gen_length^2 at fixed prompt)")


# ------------------------------------------------------------------------------------ part 2
# (task, items, choices, prompt tokens, answer tokens, mc_num) for likelihood tasks: items are the
# harness's evaluation split; token counts are assumed averages with LLaDA's tokenizer.
LIKELIHOOD_TASKS = [
    ("mmlu (5-shot)", 14042, 4, 620, 1, 1),
    ("arc_easy", 2376, 4, 30, 6, 128),
    ("arc_challenge", 1172, 4, 35, 8, 128),
    ("hellaswag", 10042, 4, 75, 25, 128),
    ("winogrande", 1267, 2, 20, 8, 128),
    ("piqa", 1838, 2, 15, 30, 128),
]
# (task, items, prompt tokens, gen_length, steps)
GENERATION_TASKS = [
    ("gsm8k (4-shot)", 1319, 700, 256, 256),
    ("minerva_math", 5000, 100, 256, 256),
    ("humaneval", 164, 140, 512, 512),
    ("mbpp (3-shot)", 500, 600, 512, 512),
]
# The study's grid on LLaDA-8B: two checkpoints (Base, Instruct) x (bf16 + GPTQ/AWQ at W4A16/W3A16
# + SmoothQuant/QuaRot/DuQuant at W8A8/W4A4).
GRID_MODELS = ("LLaDA-8B-Base", "LLaDA-8B-Instruct")
GRID_CONFIGS = ["bf16"] + [f"{m} {b}" for m in ("GPTQ", "AWQ") for b in ("W4A16-g128", "W3A16-g128")] + \
               [f"{m} {b}" for m in ("SmoothQuant", "QuaRot", "DuQuant") for b in ("W8A8", "W4A4")]


def forward_flops(params: float, layers: int, d_model: int, tokens: int, rows: int = 1) -> float:
    """FLOPs of a forward pass over `rows` sequences of `tokens` tokens each."""
    return rows * (2 * params * tokens + 4 * layers * tokens ** 2 * d_model)


def project(tflops: float) -> None:
    from dllmq.models.config import real_config
    from dllmq.models.registry import parse_model_config

    c = parse_model_config(real_config("llada-8b"))
    h, f, layers, vocab = c.hidden_size, c.intermediate_size, c.n_layers, c.vocab_size
    per_block = 4 * h * h + 3 * h * f  # q, k, v, out (MHA) + gate, up, down
    params = layers * per_block + vocab * h  # + LM head (the embedding lookup costs no FLOPs)
    rate = tflops * 1e12
    print(f"\nLLaDA-8B: {layers} layers, d_model {h}, FFN {f}, vocab {vocab}: "
          f"{params / 1e9:.2f} B parameters in matmuls (blocks + LM head)")
    print(f"forward FLOPs = 2 x {params / 1e9:.2f}e9 x T + 4 x {layers} x T^2 x {h}; assumed sustained {tflops:g} TFLOP/s")
    print(f"\n{'task':<16} {'items':>6} {'forwards/item':>14} {'tokens/forward':>15} {'PFLOP':>9} {'GPU-h':>7}")
    total = 0.0
    for name, items, choices, prompt, answer, mc in LIKELIHOOD_TASKS:
        seq = prompt + answer
        flops = items * choices * forward_flops(params, layers, h, seq, rows=mc)
        hours = flops / rate / 3600
        total += hours
        print(f"{name:<16} {items:>6} {choices:>5} x {mc:>3} rows {seq:>13} {flops / 1e15:>9.0f} {hours:>7.2f}")
    for name, items, prompt, gen, steps in GENERATION_TASKS:
        seq = prompt + gen
        flops = items * steps * forward_flops(params, layers, h, seq)
        hours = flops / rate / 3600
        total += hours
        print(f"{name:<16} {items:>6} {steps:>9} steps {seq:>13} {flops / 1e15:>9.0f} {hours:>7.2f}")
    cells = len(GRID_MODELS) * len(GRID_CONFIGS)
    print(f"{'one model, all ten tasks':<40} {total:>30.1f} GPU-hours")
    print(f"grid: {len(GRID_MODELS)} checkpoints x {len(GRID_CONFIGS)} configurations "
          f"({', '.join(GRID_CONFIGS)}) = {cells} evaluations")
    print(f"projected: {cells} x {total:.1f} = {cells * total:.0f} GPU-hours at {tflops:g} TFLOP/s sustained "
          f"({cells * total * tflops / 150:.0f} at 150 TFLOP/s); quantization itself (GPTQ ~ minutes per model, "
          "see project_8b.py) is negligible next to evaluation")
    gen_share = sum(items * steps * forward_flops(params, layers, h, prompt + gen)
                    for _, items, prompt, gen, steps in GENERATION_TASKS) / rate / 3600 / total
    print(f"generation tasks are {100 * gen_share:.0f} % of it; --limit 500 per task would cut the grid to "
          f"{cells * _limited(params, layers, h, rate, 500):.0f} GPU-hours")


def _limited(params, layers, h, rate, limit) -> float:
    hours = 0.0
    for _, items, choices, prompt, answer, mc in LIKELIHOOD_TASKS:
        hours += min(items, limit) * choices * forward_flops(params, layers, h, prompt + answer, rows=mc) / rate / 3600
    for _, items, prompt, gen, steps in GENERATION_TASKS:
        hours += min(items, limit) * steps * forward_flops(params, layers, h, prompt + gen) / rate / 3600
    return hours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the CPU measurement (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per setting (median reported)")
    parser.add_argument("--tflops", type=float, default=300.0, help="assumed sustained GPU throughput for part 2")
    parser.add_argument("--skip-measure", action="store_true", help="only print the projection")
    args = parser.parse_args()
    if not args.skip_measure:
        measure(args.threads, args.repeats)
    project(args.tflops)


if __name__ == "__main__":
    main()
