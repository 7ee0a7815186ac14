"""The BPE tokenizer of dllmq-tiny: byte-level BPE trained with `tokenizers` on the training corpus.

Digits are split one per token (arithmetic generalises), LLaDA's special tokens and chat template
are kept exactly, and the result is a `PreTrainedTokenizerFast` that `AutoTokenizer` reloads.
"""
from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from dllmq.models.tiny_tokenizer import LLADA_TOKENS

# In id order: the named tokens first, then LLaDA's chat markers.
SPECIAL_TOKENS = (LLADA_TOKENS.bos, LLADA_TOKENS.eos, LLADA_TOKENS.mask, *LLADA_TOKENS.chat)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `texts`; ids 0..5 are the special tokens (BOS, EOS, mask, chat markers)."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    bos = LLADA_TOKENS.bos
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, core.token_to_id(bos))])
    return wrap(core)


def wrap(core: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=LLADA_TOKENS.bos, eos_token=LLADA_TOKENS.eos,
        pad_token=LLADA_TOKENS.pad, mask_token=LLADA_TOKENS.mask,
        additional_special_tokens=list(LLADA_TOKENS.chat), chat_template=LLADA_TOKENS.chat_template,
        model_max_length=1024, clean_up_tokenization_spaces=False,
    )
