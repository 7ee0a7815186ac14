"""What several subcommands share: the MODEL argument, the runtime flags (declared once here), the
backend flag and loading the model the flags describe."""
from __future__ import annotations

import argparse
import logging
import time

from dllmq.api import load_model

DEFAULT_MODEL = "dllmq-tiny"
MODEL_HELP = "built-in name, checkpoint directory or Hub id"
DEVICE_HELP = "cpu, cuda, cuda:1, ... (default: cpu)"
SEED_HELP = "seed for every random choice (default: 0)"


def add_model_arg(p: argparse.ArgumentParser, help: str = MODEL_HELP) -> None:
    """The optional MODEL positional (default dllmq-tiny)."""
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL",
                   help=f"{help} (default: {DEFAULT_MODEL})")


def add_device_arg(p: argparse.ArgumentParser, help: str = DEVICE_HELP) -> None:
    p.add_argument("--device", default="cpu", help=help)


def add_calib_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-device", default=None, help="device for calibration (default: --device)")


def add_runtime_args(p: argparse.ArgumentParser, seed_help: str = SEED_HELP) -> None:
    """--dtype, --device and --seed."""
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    add_device_arg(p)
    p.add_argument("--seed", type=int, default=0, help=seed_help)


def add_model_args(p: argparse.ArgumentParser, with_runtime: bool = True, *, model_help: str = MODEL_HELP,
                   seed_help: str = SEED_HELP) -> None:
    """MODEL and (unless with_runtime=False) --dtype, --device and --seed."""
    add_model_arg(p, model_help)
    if with_runtime:
        add_runtime_args(p, seed_help)


def add_backend_arg(p: argparse.ArgumentParser, default: str, *, help: str | None = None,
                    both: bool = False) -> None:
    """--backend: how a dllmq-quantized MODEL computes (both: bench runs kernel then fake)."""
    p.add_argument("--backend", choices=("kernel", "fake", "both") if both else ("kernel", "fake"), default=default,
                   help=help or "how a dllmq-quantized MODEL computes: kernel = real int8 / int4 matmuls where one "
                                "fits (other layers stay fake; `dllmq bench` lists them), fake = quantize-dequantize, "
                                f"the study's exact reference numbers (default: {default})")


def load(args, backend: str | None = None):
    """(model, tokenizer, family) for args.model with args.dtype / device / seed and the backend."""
    start = time.perf_counter()
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, seed=args.seed,
                        backend=backend or getattr(args, "backend", "fake"))
    logging.getLogger("dllmq").info("loaded %s in %.1f s", args.model, time.perf_counter() - start)
    return loaded
