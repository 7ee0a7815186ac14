"""What `dllmq inspect` prints: shapes, parameter count and memory at each precision, from config.json alone."""
from __future__ import annotations

from dataclasses import dataclass

from dllmq.models.config import ModelConfig
from dllmq.models.family import Family

GROUP = 128  # the study's weight-only group size


@dataclass(frozen=True)
class MemoryEstimate:
    label: str
    bytes: int
    note: str


def weight_memory(config: ModelConfig) -> list[MemoryEstimate]:
    """Bytes of weights at rest. Embedding, LM head and norms stay 16-bit in every row, as in the study;
    block linears carry the quantization: W8 with an fp16 scale per output channel, W4/W3 with an fp16
    scale and a packed zero point per group of 128 inputs."""
    linear = config.n_block_linear_params
    rest = config.n_params - linear
    out_channels = config.n_layers * (2 * config.n_heads * config.head_dim + 2 * config.n_kv_heads * config.head_dim
                                      + 3 * config.hidden_size + 2 * config.intermediate_size)
    # out channels: q,k,v,o outputs + gate,up outputs + down outputs (o and down emit hidden_size each)
    rows = [MemoryEstimate("bf16", 2 * config.n_params, "every weight in bfloat16")]
    rows.append(MemoryEstimate("W8 (per-channel)", 2 * rest + linear + 2 * out_channels, "int8 block linears"))
    for bits in (4, 3):
        groups = -(-linear // GROUP)
        size = 2 * rest + -(-linear * bits // 8) + groups * 2 + -(-groups * bits // 8)
        rows.append(MemoryEstimate(f"W{bits}-g{GROUP}", size, f"{bits}-bit block linears, group {GROUP}"))
    return rows


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def describe(config: ModelConfig, family: Family) -> dict:
    """A JSON-ready summary of a model."""
    return {
        "family": family.name,
        "kind": "causal autoregressive" if family.causal else "masked diffusion (bidirectional)",
        "shift_logits": family.shift_logits,
        "layers": config.n_layers,
        "hidden_size": config.hidden_size,
        "heads": config.n_heads,
        "kv_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "ffn_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "context": config.max_seq_len,
        "rope_theta": config.rope_theta,
        "norm_eps": config.norm_eps,
        "qkv_bias": config.qkv_bias,
        "tied_embeddings": config.tie_embeddings,
        "mask_token_id": config.mask_token_id,
        "block_linears": [list(g.linears) for g in family.groups],
        "parameters": config.n_params,
        "block_linear_parameters": config.n_block_linear_params,
        "memory_bytes": {m.label: m.bytes for m in weight_memory(config)},
    }


def format_description(name: str, config: ModelConfig, family: Family) -> str:
    d = describe(config, family)
    groups = " | ".join(" ".join(g) for g in d["block_linears"])
    lines = [
        f"model        {name}",
        f"family       {d['family']} ({d['kind']}{'; logits shifted by one' if d['shift_logits'] else ''})",
        f"blocks       {d['layers']} x [{groups}]",
        f"shape        hidden {d['hidden_size']}, heads {d['heads']} (KV {d['kv_heads']}, head dim {d['head_dim']}), "
        f"FFN {d['ffn_size']}, vocab {d['vocab_size']}, context {d['context']}",
        f"details      RoPE theta {d['rope_theta']:g}, norm eps {d['norm_eps']:g}, qkv bias {'yes' if d['qkv_bias'] else 'no'}, "
        f"tied embeddings {'yes' if d['tied_embeddings'] else 'no'}, mask token {d['mask_token_id']}",
        f"parameters   {d['parameters']:,} (block linears {d['block_linear_parameters']:,})",
        "weights      " + " | ".join(f"{m.label} {human_bytes(m.bytes)}" for m in weight_memory(config)),
        "             (embedding, LM head and norms kept 16-bit; W4/W3 include fp16 scales and packed zeros per group)",
    ]
    return "\n".join(lines)
