"""The top-level entry points: a model loader that also reads dllmq's quantized checkpoints."""
from __future__ import annotations

import os

import torch

from dllmq.errors import DllmqError
from dllmq.models.loading import LoadedModel
from dllmq.models.loading import load_plain_model


def load_model(name_or_path: str | os.PathLike = "dllmq-tiny", *, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "cpu", seed: int = 0, backend: str = "fake") -> LoadedModel:
    """(model, tokenizer, family) for a built-in name, a checkpoint directory — full precision or
    quantized by dllmq — or a Hub id. A quantized directory is a MODEL everywhere. `backend` is how
    its quantized layers compute: "fake" (quantize-dequantize, the reference) or "kernel" (real
    integer matmuls where a kernel fits; see dllmq.quant.backend). With "kernel" each quantized linear
    becomes its kernel layer as its tensors stream in from the checkpoint, so the load peaks near the
    model's packed size, not at the checkpoint's size plus the converted one."""
    from dllmq.quant.backend import BACKENDS, kernel_stream, set_backend
    from dllmq.quant.format import prepare_quantized
    if backend not in BACKENDS:
        raise DllmqError(f"Unknown backend {backend!r}; use kernel or fake.")
    stream = kernel_stream() if backend == "kernel" else None
    loaded = load_plain_model(name_or_path, dtype=dtype, device=device, seed=seed, prepare=prepare_quantized,
                              stream=stream)
    set_backend(loaded.model, backend)   # reports the layers left fake (and converts a built-in random model)
    return loaded
