"""One config shape for every family, read from (and written back to) the official config.json."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from dllmq.errors import DllmqError


@dataclass
class ModelConfig:
    """Dimensions and special tokens, family-neutral. `raw` keeps the original config.json."""

    family: str
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    vocab_size: int              # rows of the embedding (LLaDA: embedding_size, may exceed the tokenizer)
    max_seq_len: int
    rope_theta: float
    norm_eps: float
    qkv_bias: bool = False
    tie_embeddings: bool = False
    mask_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    head_dim: int = 0            # 0 means hidden_size // n_heads
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // max(self.n_heads, 1)
        problems = []
        if self.n_heads <= 0 or self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            problems.append(f"{self.n_heads} attention heads cannot share {self.n_kv_heads} KV heads")
        if self.head_dim % 2:
            problems.append(f"head dim {self.head_dim} is odd, which RoPE cannot rotate")
        for name in ("hidden_size", "n_layers", "intermediate_size", "vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if problems:
            raise DllmqError(f"The model config is inconsistent: {'; '.join(problems)}.")

    @property
    def n_params(self) -> int:
        """Parameter count from the shapes (norms and biases included)."""
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        q_out, kv_out = self.n_heads * d, self.n_kv_heads * d
        attn = h * q_out + 2 * h * kv_out + q_out * h
        if self.qkv_bias:
            attn += q_out + 2 * kv_out
        block = attn + 3 * h * f + 2 * h
        head = 0 if self.tie_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.n_layers * block + h + head

    @property
    def n_block_linear_params(self) -> int:
        """Weights of the block linears: what weight-only quantization shrinks."""
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        return self.n_layers * (2 * h * self.n_heads * d + 2 * h * self.n_kv_heads * d + 3 * h * f)


def _get(raw: dict, *names: str, default: Any = None, required: bool = True) -> Any:
    for name in names:
        if name in raw and raw[name] is not None:
            return raw[name]
    if required and default is None:
        raise DllmqError(f"config.json has no {' / '.join(names)} field; is this a complete checkpoint config?")
    return default


def _first_int(value: Any) -> int | None:
    """Token ids are sometimes lists in config.json (several EOS ids); the first one is canonical."""
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def config_from_llada(raw: dict) -> ModelConfig:
    if raw.get("alibi") or not raw.get("rope", True):
        raise DllmqError("This LLaDA config uses ALiBi or no RoPE; dllmq supports the RoPE models LLaDA ships.")
    if raw.get("block_type", "llama") != "llama" or raw.get("activation_type", "silu") != "silu":
        raise DllmqError("This LLaDA config is not a SwiGLU 'llama' block model; dllmq supports LLaDA-8B's layout.")
    d_model = int(_get(raw, "d_model"))
    n_heads = int(_get(raw, "n_heads"))
    return ModelConfig(
        family="llada",
        hidden_size=d_model,
        n_layers=int(_get(raw, "n_layers")),
        n_heads=n_heads,
        n_kv_heads=int(_get(raw, "n_kv_heads", default=n_heads)),
        intermediate_size=int(_get(raw, "mlp_hidden_size")),
        vocab_size=int(_get(raw, "embedding_size", "vocab_size")),
        max_seq_len=int(_get(raw, "max_sequence_length", default=4096)),
        rope_theta=float(_get(raw, "rope_theta", default=10000.0)),
        norm_eps=float(_get(raw, "rms_norm_eps", default=1e-5)),
        qkv_bias=bool(raw.get("include_qkv_bias", False) or raw.get("include_bias", False)),
        tie_embeddings=bool(raw.get("weight_tying", False)),
        mask_token_id=_first_int(raw.get("mask_token_id", 126336)),
        bos_token_id=_first_int(raw.get("bos_token_id")),
        eos_token_id=_first_int(raw.get("eos_token_id")),
        pad_token_id=_first_int(raw.get("pad_token_id")),
        raw=raw,
    )


def config_from_qwen2_style(raw: dict, family: str) -> ModelConfig:
    """Dream (Qwen2 layout) and Llama share the transformers field names."""
    scaling = raw.get("rope_scaling")
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        raise DllmqError(f"RoPE scaling {scaling!r} is not supported; dllmq implements plain RoPE.")
    n_heads = int(_get(raw, "num_attention_heads"))
    hidden = int(_get(raw, "hidden_size"))
    rope = raw.get("rope_parameters") or {}
    return ModelConfig(
        family=family,
        hidden_size=hidden,
        n_layers=int(_get(raw, "num_hidden_layers")),
        n_heads=n_heads,
        n_kv_heads=int(_get(raw, "num_key_value_heads", default=n_heads)),
        intermediate_size=int(_get(raw, "intermediate_size")),
        vocab_size=int(_get(raw, "vocab_size")),
        max_seq_len=int(_get(raw, "max_position_embeddings", default=4096)),
        rope_theta=float(_get(raw, "rope_theta", default=rope.get("rope_theta", 10000.0))),
        norm_eps=float(_get(raw, "rms_norm_eps", default=1e-6)),
        qkv_bias=True if family == "dream" else bool(raw.get("attention_bias", False)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", family == "llama")),
        mask_token_id=_first_int(raw.get("mask_token_id")),
        bos_token_id=_first_int(raw.get("bos_token_id")),
        eos_token_id=_first_int(raw.get("eos_token_id")),
        pad_token_id=_first_int(raw.get("pad_token_id")),
        head_dim=int(raw.get("head_dim") or 0),
        raw=raw,
    )


# Where AutoGPTQ (quantize_config.json) and AutoAWQ (quant_config.json) put the quantization config
# when config.json has none.
QUANTIZATION_SIDE_FILES = ("quantize_config.json", "quant_config.json")


def read_config_json(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise DllmqError(f"{directory} has no config.json; point at a checkpoint directory that contains one.")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DllmqError(f"{path} is not valid JSON ({err.msg if hasattr(err, 'msg') else err}).") from None
    if not isinstance(raw, dict):
        raise DllmqError(f"{path} does not hold a JSON object.")
    if not raw.get("quantization_config"):  # older GPTQ and AWQ tools keep it in a file of its own
        for name in QUANTIZATION_SIDE_FILES:
            side = directory / name
            if side.is_file():
                try:
                    raw["quantization_config"] = json.loads(side.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise DllmqError(f"{side} is not valid JSON.") from None
                break
    return raw


REAL_CONFIGS = {"llada-8b": "llada-8b.json", "dream-7b": "dream-7b.json", "smollm2-135m": "smollm2-135m.json"}


def real_config(name: str) -> dict:
    """The official full-size config.json of a known model, shipped as data."""
    text = resources.files("dllmq.models").joinpath("configs", REAL_CONFIGS[name]).read_text()
    return json.loads(text)
