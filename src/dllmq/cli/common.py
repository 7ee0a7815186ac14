"""What several subcommands share: the MODEL argument, the runtime flags (declared once here, and
checked once, up front, before any command runs), the backend flag, the checks of count flags, reading
a model's config without its weights, and loading the model the flags describe."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from dllmq.api import load_model
from dllmq.errors import DllmqError
from dllmq.models.config import REAL_CONFIGS, ModelConfig, read_config_json, real_config
from dllmq.models.loading import resolve_dtype, resolve_model_dir
from dllmq.models.random_models import RANDOM_MODELS, random_config
from dllmq.models.registry import parse_model_config

DEFAULT_MODEL = "dllmq-tiny"
MODEL_HELP = "built-in name, checkpoint directory or Hub id"
DEVICE_HELP = "cpu, cuda, cuda:1, ... (default: cpu)"
SEED_HELP = "seed for every random choice (default: 0)"


# ----------------------------------------------------------------------------- the shared flags
def add_model_arg(p: argparse.ArgumentParser, help: str = MODEL_HELP) -> None:
    """The optional MODEL positional (default dllmq-tiny)."""
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL",
                   help=f"{help} (default: {DEFAULT_MODEL})")


def add_device_arg(p: argparse.ArgumentParser, help: str = DEVICE_HELP) -> None:
    p.add_argument("--device", default="cpu", help=help)
    p.set_defaults(preflight=check_runtime)


def add_calib_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-device", default=None, help="device for calibration (default: --device)")
    p.set_defaults(preflight=check_runtime)


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
                                "fits (other layers stay fake; `dllmq bench` lists them; each layer is converted as "
                                "the checkpoint streams in, so loading peaks near the low-bit size), fake = "
                                f"quantize-dequantize, the study's exact reference numbers (default: {default})")


# ----------------------------------------------------------------------------- devices
def available_devices() -> list[str]:
    """The devices this machine offers: cpu, then cuda:0 ... and mps where present."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        out.append("mps")
    return out


def check_device(value: str, flag: str = "--device") -> torch.device:
    """The torch.device that `value` names, or one DllmqError that says what this machine has."""
    here = f"available here: {', '.join(available_devices())}"
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise DllmqError(f"{flag} {value!r} is not a device name; use cpu, cuda or cuda:N ({here}).") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DllmqError(f"{flag} {value} was given but this machine has no CUDA GPU; use {flag} cpu.")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            gpus = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise DllmqError(f"{flag} {value} was given but this machine has {count} CUDA GPU"
                             f"{'s' if count > 1 else ''} ({gpus}); use one of them or {flag} cpu.")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DllmqError(f"{flag} {value} was given but this machine has no Apple GPU (MPS); use {flag} cpu.")
        return device
    raise DllmqError(f"{flag} {value} is not a device dllmq runs on; use cpu, cuda or cuda:N ({here}).")


def check_runtime(args) -> None:
    """--device / --calib-device (and --dtype where the command has it) before anything else runs."""
    for flag in ("--device", "--calib-device"):
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None:
            check_device(value, flag)
    if getattr(args, "dtype", None) is not None:
        resolve_dtype(args.dtype, args.device)


# ----------------------------------------------------------------------------- numbers
def _flag_value(args, flag: str):
    return getattr(args, flag.lstrip("-").replace("-", "_"))


def require_at_least(args, minimum: int | float, *flags: str, hint: str = "") -> None:
    """Each of `flags` (e.g. "--steps") that was given must be >= minimum."""
    for flag in flags:
        value = _flag_value(args, flag)
        if value is not None and value < minimum:
            raise DllmqError(f"{flag} must be at least {minimum}{hint}, got {value}.")


def require_positive(args, *flags: str) -> None:
    """Each of `flags` that was given must be > 0 (for numbers that need not be whole)."""
    for flag in flags:
        value = _flag_value(args, flag)
        if value is not None and not value > 0:
            raise DllmqError(f"{flag} must be positive, got {value}.")


def require_fraction(args, *flags: str) -> None:
    """Each of `flags` that was given must be in (0, 1]."""
    for flag in flags:
        value = _flag_value(args, flag)
        if value is not None and not 0 < value <= 1:
            raise DllmqError(f"{flag} must be in (0, 1], got {value}.")


# ----------------------------------------------------------------------------- the model
def model_config_json(name: str) -> tuple[dict, Path | None]:
    """(config.json dict, checkpoint directory) of MODEL without reading any weights; the directory is
    None for the built-in random models and the shipped real configs (llada-8b, ...), which have none."""
    if name in RANDOM_MODELS and not Path(name).exists():
        return random_config(name), None
    if name in REAL_CONFIGS and not Path(name).exists():
        return real_config(name), None
    directory = resolve_model_dir(name)
    return read_config_json(directory), directory


def model_config(name: str) -> ModelConfig:
    """MODEL's parsed config (its context, sizes, family) without reading any weights."""
    return parse_model_config(model_config_json(name)[0])


def load(args, backend: str | None = None):
    """(model, tokenizer, family) for args.model with args.dtype / device / seed and the backend."""
    start = time.perf_counter()
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, seed=args.seed,
                        backend=backend or getattr(args, "backend", "fake"))
    logging.getLogger("dllmq").info("loaded %s in %.1f s", args.model, time.perf_counter() - start)
    return loaded


def add_kv_cache_arg(p, scope: str = "") -> None:
    """--kv-cache: the opt-in approximate block-wise K/V cache of LLaDA generation (dllmq.diffusion.kv_cache)."""
    from dllmq.diffusion.kv_cache import KV_CACHE_MODES
    p.add_argument("--kv-cache", default="none", choices=KV_CACHE_MODES,
                   help=f"APPROXIMATE faster LLaDA generation ({scope}Fast-dLLM's block-wise K/V cache): prefix "
                        "reuses the prompt's and finished blocks' K/V within a block, dual also the later blocks'; "
                        "stale K/V can change answers (docs/evaluation.md). Default none: exact decoding")
