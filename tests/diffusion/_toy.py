"""A tiny seeded model that follows the dllmq model contract, and a matching toy tokenizer.

Vocabulary of 50: ids 0-39 are words w0..w39, then "user", "assistant", "[UNK]", and the
special tokens below. The model is one or two attention blocks over token + position embeddings;
attention is bidirectional for the diffusion kinds and causal for the "causal" kind.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn

from dllmq.models.family import Family

VOCAB = 50
IM_START, IM_END, EOT, RESERVED, BOS, EOS, MASK = 43, 44, 45, 46, 47, 48, 49
PAD = EOS
MAX_SEQ_LEN = 128


def toy_family(kind: str) -> Family:
    """A Family for "llada" (bidirectional), "dream" (bidirectional, shifted logits) or "causal"."""
    return Family(
        name={"llada": "llada", "dream": "dream", "causal": "llama"}[kind],
        model_types=(kind,),
        embed="tok",
        blocks="blocks",
        final_norm="norm",
        lm_head="head",
        groups=(),  # the fused qkv cannot be described: not quantizable
        causal=kind == "causal",
        shift_logits=kind == "dream",
    )


class ToyBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        h = h + self.out(attn)
        return h + self.mlp(self.ln2(h))


class ToyModel(nn.Module):
    """`model(ids, attention_mask=None, position_ids=None) -> logits [B, L, VOCAB]`.

    `uniform=True` zeroes the head, so every prediction is uniform over the vocabulary.
    """

    def __init__(self, kind: str = "llada", *, seed: int = 0, dim: int = 32, layers: int = 2,
                 heads: int = 2, logit_scale: float = 4.0, uniform: bool = False):
        super().__init__()
        self.family = toy_family(kind)
        self.config = SimpleNamespace(
            mask_token_id=None if kind == "causal" else MASK, eos_token_id=EOS, pad_token_id=PAD,
            bos_token_id=BOS, vocab_size=VOCAB, max_seq_len=MAX_SEQ_LEN,
        )
        self.logit_scale = logit_scale
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.tok = nn.Embedding(VOCAB, dim)
            self.pos = nn.Embedding(MAX_SEQ_LEN, dim)
            self.blocks = nn.ModuleList(ToyBlock(dim, heads) for _ in range(layers))
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, VOCAB)
        if uniform:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.eval()

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        b, n = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(n, device=input_ids.device).expand(b, n)
        dev = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones(b, n, dtype=torch.bool, device=dev)
        keys = attention_mask.bool()
        allowed = keys[:, None, :].expand(b, n, n)
        if self.family.causal:
            allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=dev).tril()
        allowed = allowed | torch.eye(n, dtype=torch.bool, device=dev)  # a padded query still sees itself
        h = self.tok(input_ids) + self.pos(position_ids)
        for block in self.blocks:
            h = block(h, allowed)
        return self.head(self.norm(h)) * self.logit_scale


class Recorder(nn.Module):
    """Wraps a model and keeps a copy of every input_ids it is called with."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.family, self.config = model.family, model.config
        self.calls: list[torch.Tensor] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        self.calls.append(input_ids.clone())
        return self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def toy_tokenizer(chat: bool = True):
    """A word-level PreTrainedTokenizerFast over the toy vocabulary (built offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(40)] + ["user", "assistant", "[UNK]"]
    specials = ["<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|reserved|>",
                "<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>"]
    vocab = {tok: i for i, tok in enumerate(words + specials)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", bos_token="<|startoftext|>",
        eos_token="<|endoftext|>", pad_token="<|endoftext|>", mask_token="<|mdm_mask|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|reserved|>"],
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok
