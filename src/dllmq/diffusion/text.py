"""From text to prompt ids and from generated ids back to text, as the official evaluations do."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from dllmq.errors import DllmqError

# End-of-turn / end-of-text tokens of the supported tokenizers (LLaDA, Dream/Qwen, Llama, SmolLM):
# the answer ends at the first of them, whatever the checkpoint calls its eos.
END_TOKENS = ("<|endoftext|>", "<|eot_id|>", "<|im_end|>", "<|end_of_text|>")

Message = dict[str, str]


def format_prompt(tokenizer, text: str | Sequence[Message], chat: bool = False) -> str:
    """The prompt string: `text` as is, or wrapped in the tokenizer's chat template (a user turn,
    or a list of {"role", "content"} messages) with the assistant turn opened."""
    if not chat:
        if not isinstance(text, str):
            raise DllmqError("A list of chat messages needs chat=True; pass plain text otherwise.")
        return text
    if not getattr(tokenizer, "chat_template", None):
        raise DllmqError(
            "The tokenizer has no chat template; drop chat mode for a base model, or use an "
            "Instruct checkpoint whose tokenizer_config.json defines one."
        )
    messages = [{"role": "user", "content": text}] if isinstance(text, str) else list(text)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def pad_token_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def encode_prompts(tokenizer, texts: Sequence[str], *, chat: bool = False) -> tuple[Tensor, Tensor]:
    """Token ids [B, P], left-padded, and the bool attention mask (True = real token).

    A chat-formatted prompt already holds its special tokens, so none are added again.
    """
    if not texts:
        raise DllmqError("No prompts were given; pass at least one prompt.")
    rows = [tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in texts]
    if any(len(r) == 0 for r in rows):
        raise DllmqError("A prompt tokenizes to nothing; give every prompt at least one token.")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = True
    return ids, mask


def stop_token_ids(tokenizer, model: torch.nn.Module | None = None) -> list[int]:
    """The ids that end an answer: the tokenizer's and the model's eos, plus every END_TOKENS
    token the vocabulary has."""
    ids = {tokenizer.eos_token_id}
    if model is not None:
        ids.add(getattr(model.config, "eos_token_id", None))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_TOKENS if t in vocab)
    return sorted(int(i) for i in ids if i is not None)


def decode_generation(
    tokenizer,
    output_ids: Tensor,
    prompt_length: int,
    *,
    stop_ids: Iterable[int] | None = None,
    stop_strings: Sequence[str] = (),
    model: torch.nn.Module | None = None,
) -> list[str]:
    """The generated text of each row: ids after `prompt_length`, cut before the first stop token,
    decoded without special tokens, then cut before the first of `stop_strings`."""
    stops = set(stop_ids) if stop_ids is not None else set(stop_token_ids(tokenizer, model))
    texts = []
    for row in torch.as_tensor(output_ids)[:, prompt_length:].tolist():
        cut = next((i for i, tok in enumerate(row) if tok in stops), len(row))
        text = tokenizer.decode(row[:cut], skip_special_tokens=True)
        for s in stop_strings:
            if s and s in text:
                text = text[: text.index(s)]
        texts.append(text)
    return texts
