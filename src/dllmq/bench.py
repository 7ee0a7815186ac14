"""Speed and memory (the library of `dllmq bench`): how fast a model (full precision or quantized) runs and how much memory it holds.

One diffusion step runs the whole sequence through the model, so the forward latency at the
sequence length is the unit cost; generation time adds the sampler. Measured: forward latency
(median of repeats), generation tokens/s and time per step for the same random prompt and step
count, the bytes of weights held in memory, and the process's peak resident memory. With
``--backend both`` the CLI (dllmq.cli.bench) runs the kernel and fake backends on the same loaded model,
in one process.
"""
from __future__ import annotations

import logging
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from dllmq.diffusion import generate as run_generate
from dllmq.errors import DllmqError
from dllmq.models.describe import human_bytes
from dllmq.quant.backend import backend_report, weight_bytes
from dllmq.quant.kernels import scratch_bytes

log = logging.getLogger(__name__)


@dataclass
class BenchResult:
    """One backend's numbers on one model."""

    model: str
    backend: str
    dtype: str
    kernels: dict[str, int] = field(default_factory=dict)
    kernel_summary: str = ""
    threads: int = 1
    batch: int = 1
    seq_len: int = 0
    gen_length: int = 0
    steps: int = 0
    forward_ms: float = 0.0
    forward_min_ms: float = 0.0
    generate_s: float = 0.0
    step_ms: float = 0.0
    tokens_per_s: float = 0.0
    model_bytes: int = 0        # parameters + buffers as held now
    quant_weight_bytes: int = 0  # of which: quantized layers' weight storage
    scratch_bytes: int = 0      # kernels' reusable temporaries after the run
    peak_rss_bytes: int = 0
    anon_rss_bytes: int = 0     # private memory after the run (clean pages mapped from the checkpoint file excluded)


def _proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status ("VmHWM", "RssAnon", ...) in bytes; None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def anon_rss_bytes() -> int:
    """This process's private resident memory now (Linux RssAnon; 0 where unknown)."""
    return _proc_status_bytes("RssAnon") or 0


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far. On Linux from VmHWM: ru_maxrss survives exec, so a
    benchmark child started by a big parent would report the parent's peak."""
    peak_hwm = _proc_status_bytes("VmHWM")
    if peak_hwm is not None:
        return peak_hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def model_bytes(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_model(model: torch.nn.Module, tokenizer, *, name: str = "", seq_len: int = 512, gen_length: int = 256,
                steps: int = 16, block_length: int | None = None, batch: int = 1, repeats: int = 3,
                seed: int = 0, generate: bool = True) -> BenchResult:
    """Time ``model`` as it is now (its backend is whatever set_backend last chose)."""
    if seq_len <= 0 or batch <= 0 or repeats <= 0:
        raise DllmqError("--seq-len, --batch and --repeats must be positive.")
    if seq_len > model.config.max_seq_len:
        raise DllmqError(f"--seq-len {seq_len} is longer than the model's context of {model.config.max_seq_len}.")
    if generate and not 0 < gen_length < seq_len:
        raise DllmqError(f"--gen-length must be between 1 and --seq-len - 1 ({seq_len - 1}); the rest is the prompt.")
    report = backend_report(model)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    vocab = min(model.config.vocab_size, 256)  # ordinary token ids, never the mask token
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)
    result = BenchResult(model=name, backend=report.backend, dtype=str(dtype).removeprefix("torch."),
                         kernels=report.counts(), kernel_summary=report.summary(),
                         threads=torch.get_num_threads(), batch=batch, seq_len=seq_len)
    with torch.inference_mode():
        model(ids)  # warm-up: scratch buffers, lazy tables
        times = _timed(lambda: model(ids), repeats)
        result.forward_ms, result.forward_min_ms = 1e3 * statistics.median(times), 1e3 * min(times)
        if generate:
            prompt = ids[:, : seq_len - gen_length]
            settings = dict(gen_length=gen_length, steps=steps, block_length=block_length or gen_length)
            start = time.perf_counter()
            run_generate(model, tokenizer, prompt, **settings)
            result.generate_s = time.perf_counter() - start
            result.gen_length, result.steps = gen_length, steps
            result.step_ms = 1e3 * result.generate_s / max(steps, 1)
            result.tokens_per_s = batch * gen_length / result.generate_s
    result.model_bytes = model_bytes(model)
    result.quant_weight_bytes = weight_bytes(model)
    result.scratch_bytes = scratch_bytes()
    result.peak_rss_bytes = peak_rss_bytes()
    result.anon_rss_bytes = anon_rss_bytes()
    return result


def format_result(r: BenchResult) -> str:
    lines = [f"{r.model}  backend {r.backend}  {r.dtype}  {r.threads} threads  batch {r.batch}",
             f"  kernels      {r.kernel_summary}",
             f"  forward      {r.forward_ms:.1f} ms median ({r.forward_min_ms:.1f} min) at {r.seq_len} tokens"]
    if r.gen_length:
        lines.append(f"  generate     {r.gen_length} tokens in {r.steps} steps: {r.generate_s:.2f} s, "
                     f"{r.step_ms:.1f} ms/step, {r.tokens_per_s:.1f} tokens/s")
    lines.append(f"  memory       weights {human_bytes(r.model_bytes)}"
                 + (f" (quantized layers {human_bytes(r.quant_weight_bytes)})" if r.quant_weight_bytes else "")
                 + f", kernel scratch {human_bytes(r.scratch_bytes)}, peak RSS {human_bytes(r.peak_rss_bytes)}"
                 + (f", private RSS now {human_bytes(r.anon_rss_bytes)}" if r.anon_rss_bytes else ""))
    return "\n".join(lines)
