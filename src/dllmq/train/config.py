"""The settings of a training run and the config.json of the model it trains (LLaDA's, Llama's for the AR
twin, Dream's for the Dream twin).

Read by the training loop and by the export (which reproduces a run's command line and rebuilds a
model from a checkpoint), so neither imports the other for them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from dllmq.errors import DllmqError
from dllmq.models.config import read_config_json, real_config

# Settings that change how a run executes, not what it computes: a run may resume with others.
RUNTIME_SETTINGS = ("threads", "log_every", "checkpoint_every")
# base: LLaDA pre-training; instruct: LLaDA SFT from a base model; ar: the same pre-training data with
# next-token prediction, into a causal Llama of the same size (the autoregressive baseline); dream: the AR
# twin converted to Dream's architecture (GQA, q/k/v bias, bidirectional) and adapted to masked diffusion
# with shifted prediction, as Dream-7B was adapted from Qwen2.5-7B.
STAGES = ("base", "instruct", "ar", "dream")
SFT_BATCHES = ("by_kind", "mixed")
SFT_FORMATS = ("chat", "plain")
# Settings added after runs were recorded: (the value a stored train_config.json without the field meant,
# the stages it applies to), so an old run resumes and its recorded command reproduces it unchanged.
LEGACY_VALUES = {"sft_batches": ("mixed", ("instruct",)), "sft_min_response": (0, ("instruct",))}


@dataclass
class TrainConfig:
    stage: str = "base"                 # base | instruct | ar (the causal twin) | dream (the AR twin made Dream)
    out: str = "runs/base"
    steps: int = 1000                   # the schedule's length (a run is done at this step)
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    # model (base stage; instruct inherits the base model's shape)
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    mlp_hidden_size: int = 704
    vocab_size: int = 4096
    max_sequence_length: int = 1024
    # data mixture of pre-training rows (weights)
    # (per pick; a wiki/python pick is ~128 tokens, math ~50, code ~85: tokens ~ 35/7/28/30 %)
    mix: dict = field(default_factory=lambda: {"wiki": 0.22, "python": 0.05, "math": 0.45, "code": 0.28})
    init: str = ""                      # instruct: the base model's directory; dream: the AR twin's (Llama layout)
    n_kv_heads: int = 2                 # dream: key/value heads (GQA) the AR twin's heads are pooled into
    tokenizer: str = ""                 # a directory whose tokenizer to use instead of training one (ar: dllmq-tiny's)
    pretrain_every: int = 4             # instruct: every n-th step is a pre-training step (0: never)
    # instruct: kinds of SFT pairs (weights): text continuation, math, code
    sft_mix: dict = field(default_factory=lambda: {"general": 0.3, "math": 0.35, "code": 0.35})
    # instruct: "by_kind": each SFT batch holds rows of one kind (drawn by sft_mix), so a math row's few answer
    # tokens are not outweighed by EOS padding up to a code row's width; "mixed": rows of any kind in one batch
    # (LLaDA's recipe as written; dllmq-tiny-instruct v1). See SFT_BATCHES.
    sft_batches: str = "by_kind"
    # instruct: "chat": pairs in the chat template (an instruct model); "plain": pairs as a base model is asked
    # ("Question: ... Answer:" + " 77"), so the result stays a base model (math mid-training, see SFT_FORMATS)
    sft_format: str = "chat"
    # instruct: EOS-pad each row's response to at least this many tokens. LLaDA pads to the batch's widest row,
    # so in mixed batches a short answer is followed by a long EOS tail, as in generation (gen_length masks of
    # which the answer fills a few); one-kind math batches are only a few tokens wider than their answers, and
    # a model trained on them fails when asked to fill 8 slots (docs/embedded-models.md, "Math"). 0: no minimum.
    sft_min_response: int = 8
    checkpoint_every: int = 50
    log_every: int = 10
    bf16_autocast: bool = True
    threads: int = 0                    # 0: torch default
    # corpus size limits (0 = everything; small values are for tests)
    max_wiki_docs: int = 0
    max_python_docs: int = 0
    tokenizer_items: int = 4000         # generated math/code items added to the tokenizer's training text

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise DllmqError(f"Unknown stage {self.stage!r}; use {', '.join(STAGES)}.")
        if self.steps <= 0 or self.batch_size <= 0 or self.seq_len <= 0:
            raise DllmqError("steps, batch size and sequence length must be positive.")
        for name, mix, known in (("mix", self.mix, {"wiki", "python", "math", "code"}),
                                 ("sft_mix", self.sft_mix, {"general", "math", "code"})):
            if not mix or set(mix) - known or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
                raise DllmqError(f"--{name.replace('_', '-')} must map some of {', '.join(sorted(known))} "
                                 f"to non-negative weights, got {mix}.")
        if self.n_kv_heads <= 0:
            raise DllmqError(f"--n-kv-heads must be positive, got {self.n_kv_heads}.")
        if self.sft_batches not in SFT_BATCHES:
            raise DllmqError(f"Unknown --sft-batches {self.sft_batches!r}; use {', '.join(SFT_BATCHES)}.")
        if self.sft_min_response < 0:
            raise DllmqError(f"--sft-min-response must be 0 or more tokens, got {self.sft_min_response}.")
        if self.sft_format not in SFT_FORMATS:
            raise DllmqError(f"Unknown --sft-format {self.sft_format!r}; use {', '.join(SFT_FORMATS)}.")
        if self.d_model % 64 or self.d_model // 64 != self.n_heads:
            raise DllmqError(f"d_model {self.d_model} with {self.n_heads} heads: dllmq-tiny uses head dim 64 "
                             "(n_heads = d_model / 64).")


def stored_settings(saved: dict) -> dict:
    """A stored train_config.json's settings, a field it predates filled with what the run used then
    (its LEGACY_VALUES entry for the run's stage, else today's default, which the stage ignores)."""
    out = dict(saved)
    stage = saved.get("stage", TrainConfig.stage)
    for key, (value, stages) in LEGACY_VALUES.items():
        out.setdefault(key, value if stage in stages else getattr(TrainConfig(), key))
    return out


def padded_vocab(cfg: TrainConfig, tokenizer) -> int:
    """Embedding rows: the tokenizer's size (or --vocab-size if larger), rounded up to a multiple of 64."""
    return -(-max(cfg.vocab_size, len(tokenizer)) // 64) * 64


def tiny_model_config(cfg: TrainConfig, tokenizer) -> dict:
    """The config.json of the model a fresh run trains: LLaDA's for base, Llama's for the AR twin, Dream's
    (shaped by the AR model in --init) for the Dream twin."""
    if cfg.stage == "dream":
        if not cfg.init or not (Path(cfg.init) / "config.json").is_file():
            raise DllmqError("The dream stage needs --init DIR, the AR twin's model directory (with config.json), "
                             "e.g. runs/ar/final or src/dllmq/tiny/dllmq-tiny-ar.")
        return dream_twin_config(read_config_json(Path(cfg.init)), tokenizer.mask_token_id, cfg.n_kv_heads)
    return llama_tiny_config(cfg, tokenizer) if cfg.stage == "ar" else llada_tiny_config(cfg, tokenizer)


def llada_tiny_config(cfg: TrainConfig, tokenizer) -> dict:
    """The official LLaDA config.json fields, scaled down to the tiny model."""
    raw = copy.deepcopy(real_config("llada-8b"))
    vocab = padded_vocab(cfg, tokenizer)
    raw.update(
        d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads,
        mlp_hidden_size=cfg.mlp_hidden_size, mlp_ratio=round(cfg.mlp_hidden_size / cfg.d_model, 2),
        vocab_size=vocab, embedding_size=vocab, max_sequence_length=cfg.max_sequence_length,
        rope_theta=10000.0, init_device="cpu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, mask_token_id=tokenizer.mask_token_id,
    )
    return raw


def llama_tiny_config(cfg: TrainConfig, tokenizer) -> dict:
    """transformers' LlamaForCausalLM config.json fields (SmolLM2-135M's file), scaled to the tiny model's
    size: the same widths, heads (MHA), RoPE and norm epsilon as dllmq-tiny, input embedding and LM head
    tied as SmolLM2 and Qwen2.5's small models do (the weights cost 11 MB in bf16 instead of 12.3)."""
    raw = copy.deepcopy(real_config("smollm2-135m"))
    raw.update(
        hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads, head_dim=cfg.d_model // cfg.n_heads,
        intermediate_size=cfg.mlp_hidden_size, vocab_size=padded_vocab(cfg, tokenizer),
        max_position_embeddings=cfg.max_sequence_length, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return raw


def dream_twin_config(llama: dict, mask_token_id: int | None, n_kv_heads: int) -> dict:
    """Dream-7B's config.json fields, shaped as the Llama model `llama` (the AR twin's config.json) with its
    heads shared by `n_kv_heads` key/value heads (Dream-7B: 28 query heads on 4 KV heads). Dream adds
    q/k/v biases (always, like Qwen2) and a mask token; the embedding stays tied as in the AR twin."""
    if llama.get("model_type") != "llama":
        raise DllmqError(f"--init must be the AR twin (model_type llama), not model_type {llama.get('model_type')!r}.")
    heads = int(llama["num_attention_heads"])
    if int(llama.get("num_key_value_heads", heads)) != heads:
        raise DllmqError("--init has grouped key/value heads already; the dream stage pools an MHA model's heads.")
    if heads % n_kv_heads:
        raise DllmqError(f"{heads} attention heads cannot be pooled into {n_kv_heads} key/value heads; "
                         "--n-kv-heads must divide the AR twin's head count.")
    if mask_token_id is None:
        raise DllmqError("The tokenizer has no mask token; the Dream twin needs one for masked diffusion.")
    hidden = int(llama["hidden_size"])
    if int(llama.get("head_dim") or hidden // heads) != hidden // heads:
        raise DllmqError("--init has a head dim other than hidden_size / heads, which Dream's config cannot state.")
    raw = copy.deepcopy(real_config("dream-7b"))
    raw.update(
        hidden_size=hidden, num_hidden_layers=llama["num_hidden_layers"], max_window_layers=llama["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=n_kv_heads, intermediate_size=llama["intermediate_size"],
        vocab_size=llama["vocab_size"], max_position_embeddings=llama["max_position_embeddings"],
        rope_theta=llama["rope_theta"], rms_norm_eps=llama["rms_norm_eps"],
        tie_word_embeddings=bool(llama.get("tie_word_embeddings", False)),
        bos_token_id=llama.get("bos_token_id"), eos_token_id=llama.get("eos_token_id"),
        pad_token_id=llama.get("pad_token_id"), mask_token_id=mask_token_id,
    )
    return raw
