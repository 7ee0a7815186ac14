"""The subcommands of `dllmq`, in the order `dllmq --help` lists them: name -> (module, one-line help).

Kept free of imports so that `dllmq --help` and a mistyped command load no subcommand module (and so
no torch); the chosen command's module is imported when it runs."""

COMMANDS = {
    "inspect": ("dllmq.cli.inspect", "family, shapes, parameter count and memory at bf16 / W8 / W4 / W3"),
    "generate": ("dllmq.cli.generate",
                 "diffusion generation (LLaDA blocks / Dream algorithms) or causal decoding"),
    "ppl": ("dllmq.cli.ppl", "perplexity: Monte Carlo ELBO bound for diffusion models, exact for causal ones"),
    "quantize": ("dllmq.cli.quantize",
                 "RTN / GPTQ / AWQ / SmoothQuant / QuaRot / DuQuant, block by block, saved to --out"),
    "export": ("dllmq.cli.export", "write a quantized model for other tools: GPTQ v1, AWQ GEMM, compressed-tensors"),
    "eval": ("dllmq.cli.eval", "the study's benchmarks (lm-evaluation-harness) and the offline mini tasks"),
    "bench": ("dllmq.cli.bench", "speed and memory: forward latency, generation tokens/s, weights in memory"),
    "outliers": ("dllmq.cli.outliers",
                 "activation outlier profile (normal / massive outliers vs mask ratio) + plots"),
    "study": ("dllmq.cli.study",
              "run a models x methods x bits x tasks grid into a results database (resumable)"),
    "report": ("dllmq.cli.report", "degradation tables, plots and the paper's findings from a study database"),
}


def help_of(name: str) -> str:
    return COMMANDS[name][1]
