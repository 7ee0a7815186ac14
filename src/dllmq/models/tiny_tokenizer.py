"""A byte-level tokenizer for the built-in random models: 256 byte tokens plus the family's special
tokens and chat template, built with `tokenizers` so it saves and reloads like any HF tokenizer."""
from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


@dataclass(frozen=True)
class SpecialTokens:
    bos: str
    eos: str
    pad: str
    mask: str
    chat: tuple[str, ...]  # chat markers, in id order after the named ones
    chat_template: str


LLADA_TOKENS = SpecialTokens(
    bos="<|startoftext|>", eos="<|endoftext|>", pad="<|endoftext|>", mask="<|mdm_mask|>",
    chat=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    # LLaDA-8B-Instruct's format (Llama-3 style headers).
    chat_template=(
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
)

DREAM_TOKENS = SpecialTokens(
    bos="<|beginoftext|>", eos="<|endoftext|>", pad="<|endoftext|>", mask="<|mask|>",
    chat=("<|im_start|>", "<|im_end|>"),
    # Dream-Instruct's format (Qwen2.5 ChatML with its default system prompt).
    chat_template=(
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
)

LLAMA_TOKENS = SpecialTokens(
    bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>", mask="<|mask|>", chat=(),
    # SmolLM2-Instruct's ChatML, without its default system prompt.
    chat_template=(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
)


def byte_level_tokenizer(special: SpecialTokens) -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    names = [special.bos, special.eos, special.pad, special.mask, *special.chat]
    core.add_special_tokens(list(dict.fromkeys(names)))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=special.bos, eos_token=special.eos, pad_token=special.pad, mask_token=special.mask,
        chat_template=special.chat_template,
    )
