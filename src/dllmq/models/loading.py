"""Load a model by name, directory or Hub id; save one in the official layout.

No `trust_remote_code`, no unpickling: config.json is parsed by dllmq, weights are read from
safetensors through a memory map, tokenizers come from `AutoTokenizer` on the directory.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn

from dllmq.atomic import atomic_directory
from dllmq.errors import DllmqError
from dllmq.models.config import ModelConfig, read_config_json
from dllmq.models.family import Family
from dllmq.models.modeling import TransformerLM
from dllmq.models.random_models import RANDOM_MODELS, random_model
from dllmq.models.registry import build_model, parse_model_config
from dllmq.models.safetensors_io import load_tensors, save_tensors

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


class LoadedModel(NamedTuple):
    model: TransformerLM
    tokenizer: object  # a transformers tokenizer, or None when the directory has none
    family: Family


def builtin_names() -> list[str]:
    from dllmq.tiny import NAMES
    return [*NAMES, *RANDOM_MODELS]


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """'auto' is bfloat16 on an accelerator (the checkpoints' own dtype) and float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    try:
        return DTYPES[dtype]
    except KeyError:
        raise DllmqError(f"Unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}.") from None


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DllmqError(f"{path} is a file; give the checkpoint directory that contains config.json.")
        return path
    text = str(name_or_path)
    from dllmq import tiny
    if text in tiny.NAMES:  # the trained models shipped inside the package
        return tiny.checkpoint_dir(text)
    if _HUB_ID.match(text):
        from huggingface_hub import snapshot_download

        try:  # honours HF_HUB_OFFLINE: then only the local cache is read
            return Path(snapshot_download(text, allow_patterns=_HUB_FILES))
        except Exception as err:  # the hub client raises many types; the user needs one sentence
            raise DllmqError(
                f"{text} is not a local directory and could not be fetched from the Hugging Face Hub or its cache "
                f"({type(err).__name__}); download it where there is network and pass the directory."
            ) from None
    raise DllmqError(
        f"No model directory {path}; give a checkpoint directory, a Hub id (org/name), "
        f"or a built-in name ({', '.join(builtin_names())})."
    )


Prepare = Callable[[TransformerLM, dict, dict], None]


@dataclass
class Stream:
    """Modules converted one at a time as the checkpoint is read: each module that `claims` accepts gets
    its own tensors in fresh memory (read from the file, never through the shared map), and is replaced by
    what `convert(path, module)` returns before the next one is read. So converting every layer costs the
    converted size plus one layer's working set, not the checkpoint's size on top."""

    claims: Callable[[nn.Module], bool]
    convert: Callable[[str, nn.Module], nn.Module]


def load_checkpoint(directory: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    prepare: Prepare | None = None, stream: Stream | None = None) -> TransformerLM:
    """Build the module tree without memory, then adopt the checkpoint tensors (checked, converted).

    `prepare(model, raw_config, tensors)` may reshape the meta model first (a quantized checkpoint swaps
    its linears for quantized ones) and rewrite the (memory-mapped) tensors it is given (another tool's
    layout converted to dllmq's). Parameters take `dtype`; buffers (packed codes, scales) keep theirs.
    `stream` converts the modules it claims as they are read (see Stream); the others are mapped as usual.
    """
    raw = read_config_json(directory)
    config = parse_model_config(raw)
    tensors = load_tensors(directory)
    with torch.device("meta"):
        model = build_model(config)
        if prepare is not None:
            prepare(model, raw, tensors)
    expected = model.state_dict()
    head, embed = f"{model.family.lm_head}.weight", f"{model.family.embed}.weight"
    if config.tie_embeddings and head not in tensors and embed in tensors:
        tensors[head] = tensors[embed]
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DllmqError(f"The checkpoint in {directory} lacks tensor {missing[0]}{more}; it is incomplete or of another model.")
    for name, meta in expected.items():
        if tuple(tensors[name].shape) != tuple(meta.shape):
            raise DllmqError(
                f"Tensor {name} has shape {tuple(tensors[name].shape)} in the checkpoint but config.json implies "
                f"{tuple(meta.shape)}; the config and weights do not belong together."
            )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        log.warning("ignoring %d checkpoint tensors the model does not use, e.g. %s", len(unexpected), unexpected[0])
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}

    def adopt(name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=device, dtype=dtype if name in params else tensor.dtype)

    streamed = [] if stream is None else [path for path, m in model.named_modules() if path and stream.claims(m)]
    owned = {name for path in streamed for name in expected if name.startswith(path + ".")}
    state = {name: adopt(name, tensors[name]) for name in expected if name not in owned}
    result = model.load_state_dict(state, assign=True, strict=not owned)
    if set(result.missing_keys) != owned or result.unexpected_keys:  # only the streamed modules wait
        raise RuntimeError(f"state mismatch outside the streamed modules: {result}")
    for path in streamed:
        module = model.get_submodule(path)
        prefix = path + "."
        module.load_state_dict({name.removeprefix(prefix): adopt(name, tensors.read_unmapped(name))
                                for name in expected if name.startswith(prefix)}, assign=True, strict=True)
        model.set_submodule(path, stream.convert(path, module))
        del module   # its tensors go now, before the next module's are read
    model.tie_weights()
    return model.eval()


def load_tokenizer(directory: Path):
    """AutoTokenizer without remote code; falls back to tokenizer.json when the config names a remote class."""
    if not any((directory / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        log.warning("%s has no tokenizer files; text commands will not work with it", directory)
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    try:
        previous = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # it reads config.json and warns that model_type "llada" is unknown to it
        try:
            return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
        finally:
            hf_logging.set_verbosity(previous)
    except Exception as err:  # e.g. Dream's tokenizer_config names remote code
        if not (directory / "tokenizer.json").is_file():
            raise DllmqError(f"The tokenizer in {directory} cannot be loaded without remote code ({err}).") from None
        log.info("AutoTokenizer failed (%s); reading tokenizer.json directly", err)
        extra = {}
        cfg = directory / "tokenizer_config.json"
        if cfg.is_file():
            data = json.loads(cfg.read_text())
            extra = {k: data[k] for k in ("bos_token", "eos_token", "pad_token", "mask_token", "chat_template")
                     if isinstance(data.get(k), str)}
        return PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), **extra)


def load_plain_model(name_or_path: str | os.PathLike = "dllmq-tiny", *, dtype: str | torch.dtype = "auto",
                     device: str | torch.device = "cpu", seed: int = 0,
                     prepare: Prepare | None = None, stream: Stream | None = None) -> LoadedModel:
    """The model (eval mode), its tokenizer and its family description, as the checkpoint stores it:
    quantized layers are only rebuilt through `prepare` (dllmq.load_model passes it; use that one).

    `name_or_path`: a built-in name (the shipped trained dllmq-tiny / dllmq-tiny-instruct, or the
    random random-llada / random-dream / random-llama), a checkpoint
    directory (config.json + safetensors, single or sharded), or a Hub id when network or the HF
    cache allows. `seed` only matters for built-in random models. `stream`: see load_checkpoint.
    """
    torch_dtype = resolve_dtype(dtype, device)
    if str(name_or_path) in RANDOM_MODELS and not Path(name_or_path).exists():
        model, tokenizer = random_model(str(name_or_path), seed=seed, dtype=torch_dtype)
        return LoadedModel(model.to(device), tokenizer, model.family)
    directory = resolve_model_dir(name_or_path)
    model = load_checkpoint(directory, torch_dtype, device, prepare, stream)
    return LoadedModel(model, load_tokenizer(directory), model.family)


def state_dict_for_saving(model: TransformerLM) -> dict[str, torch.Tensor]:
    state = dict(model.state_dict())
    if model.config.tie_embeddings:  # tied checkpoints store the embedding once, as HF does
        state.pop(f"{model.family.lm_head}.weight", None)
    return state


def config_for_saving(config: ModelConfig, dtype: torch.dtype, extra: dict | None = None) -> dict:
    raw = dict(config.raw)
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    raw.update(extra or {})
    return raw


def save_model(model: TransformerLM, tokenizer, out: str | os.PathLike, *, max_shard_bytes: int | None = None,
               overwrite: bool = False, extra_config: dict | None = None, tensors: dict[str, torch.Tensor] | None = None,
               extra_files: dict[str, str] | None = None) -> Path:
    """Write config.json (official field names, plus `extra_config` entries such as a
    quantization_config), safetensors (the model's state, or `tensors` when given; sharded past
    max_shard_bytes), the tokenizer and `extra_files` (name -> text), all beside `out`, then rename the
    directory to `out`. An existing `out` is refused, or with `overwrite` swapped for the new one in one
    step: a crash never leaves less than the old or the new model."""
    out = Path(out)
    if getattr(model, "staged", None) is not None:   # its state holds both precisions under .high / .low
        raise DllmqError("A staged model holds two precisions and has no checkpoint format; save the low-bit and "
                         "the full-precision models it was built from instead.")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        dtype = next(model.parameters()).dtype
        config = config_for_saving(model.config, dtype, extra_config)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_tensors(state_dict_for_saving(model) if tensors is None else tensors, tmp, max_shard_bytes)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out
