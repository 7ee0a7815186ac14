"""Text for calibration and perplexity: the shipped offline Wikipedia, the study's sets, local files.

Named corpora:
- `wiki`: English Wikipedia text shipped inside dllmq (no network; see data/wiki/ATTRIBUTION.md).
  Split `train` (calibration) or `heldout` (perplexity only; no article is in both).
- `wikitext2`: WikiText-2 raw through HF `datasets` (the GPTQ reference's calibration set);
  split `train` or `heldout` (its test split), text joined with blank lines as GPTQ does.
- `pile`: the Pile validation set through HF `datasets` (mit-han-lab/pile-val-backup, as AWQ uses
  for calibration); only `train` (= calibration), which reads the validation documents.
Or a path: a `.txt` file, or a `.jsonl` file with a "text" field per line (either may be gzipped).
"""
from __future__ import annotations

import functools
import gzip
import json
import os
import random
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from dllmq.errors import DllmqError

CORPORA = ("wiki", "wikitext2", "pile")
SPLITS = ("train", "heldout")
_SPLIT_ALIASES = {"train": "train", "calibration": "train", "heldout": "heldout", "test": "heldout"}
PILE_SHUFFLE_SEED = 42      # AWQ shuffles the Pile validation set with this seed
PILE_MAX_DOCUMENTS = 5000   # far more text than 128 x 2048 tokens; AWQ itself reads 128 documents


def _split(split: str) -> str:
    try:
        return _SPLIT_ALIASES[split]
    except KeyError:
        raise DllmqError(f"Unknown split {split!r}; use {' or '.join(SPLITS)}.") from None


@functools.lru_cache(maxsize=None)
def _wiki(split: str) -> str:
    resource = resources.files("dllmq.data").joinpath("wiki", f"enwiki_{split}.txt.gz")
    try:
        return gzip.decompress(resource.read_bytes()).decode("utf-8")
    except FileNotFoundError:
        raise DllmqError(
            f"The shipped Wikipedia text ({resource.name}) is missing from this dllmq installation; "
            "reinstall dllmq or regenerate it with scripts/extract_wiki.py."
        ) from None


def _hf_dataset(label: str, *args, **kwargs):
    """datasets.load_dataset, with every way it can fail offline turned into one DllmqError."""
    offline = "use --calib wiki (offline Wikipedia shipped with dllmq) or --calib PATH.txt."
    try:
        from datasets import load_dataset
    except ImportError:
        raise DllmqError(f"{label} needs the HF datasets package, which is not installed; "
                         f"pip install datasets, or {offline}") from None
    try:
        return load_dataset(*args, **kwargs)
    except Exception as err:  # ConnectionError, offline-mode and missing-cache errors, ...
        raise DllmqError(
            f"{label} could not be loaded (no network or HF cache: {type(err).__name__}); {offline}"
        ) from None


def _wikitext2(split: str) -> str:
    data = _hf_dataset("wikitext2", "wikitext", "wikitext-2-raw-v1", split="train" if split == "train" else "test")
    return "\n\n".join(data["text"])


def _pile(split: str) -> str:
    if split != "train":
        raise DllmqError("pile has only a calibration split in dllmq; use wiki or wikitext2 for held-out text.")
    data = _hf_dataset("pile", "mit-han-lab/pile-val-backup", split="validation")
    data = data.shuffle(seed=PILE_SHUFFLE_SEED)
    docs = (row["text"].strip() for row in data.select(range(min(len(data), PILE_MAX_DOCUMENTS))))
    return "\n\n".join(d for d in docs if d)


def _read_bytes(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DllmqError(f"{path} is not UTF-8 text; convert it to UTF-8.") from None


def _jsonl_records(path: Path):
    """(line number, parsed record) of every non-blank line; a line that is not JSON is one sentence."""
    for number, line in enumerate(_read_bytes(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError:
            raise DllmqError(f"Line {number} of {path} is not valid JSON; give one JSON object per line.") from None


def _read_jsonl(path: Path) -> str:
    texts = []
    for number, record in _jsonl_records(path):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DllmqError(f"Line {number} of {path} has no string field \"text\"; every line needs one.")
        texts.append(record["text"])
    return "\n\n".join(texts)


def _file_kind(path: Path) -> str:
    """".txt" or ".jsonl" (also gzipped) for an existing text file, else one DllmqError."""
    if not path.is_file():
        raise DllmqError(f"No text file {path}; give {', '.join(CORPORA)}, or a path to a .txt or .jsonl file.")
    suffixes = [s.lower() for s in path.suffixes]
    kind = suffixes[-2] if suffixes[-1:] == [".gz"] and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    if kind not in (".txt", ".jsonl"):
        raise DllmqError(f"{path} is neither .txt nor .jsonl; give plain text (.txt) or JSON lines with a \"text\" "
                         "field.")
    return kind


def _read_file(path: Path) -> str:
    return _read_jsonl(path) if _file_kind(path) == ".jsonl" else _read_bytes(path)


def check_corpus(name_or_path: str | os.PathLike) -> None:
    """Raise the DllmqError load_corpus would for a missing or unreadable kind of file, without reading
    it (named corpora pass: whether they can be fetched is known only when they are)."""
    if os.fspath(name_or_path) not in CORPORA:
        _file_kind(Path(name_or_path).expanduser())


def load_corpus(name_or_path: str | os.PathLike, split: str = "train") -> str:
    """The text of a named corpus (wiki, wikitext2, pile) or of a .txt / .jsonl file.

    `split` is `train` (calibration) or `heldout` (perplexity; `test` is accepted too). A file is
    read whole whatever the split. Raises DllmqError when the text is missing or empty.
    """
    split = _split(split)
    name = os.fspath(name_or_path)
    if name == "wiki":
        text = _wiki(split)
    elif name == "wikitext2":
        text = _wikitext2(split)
    elif name == "pile":
        text = _pile(split)
    else:
        text = _read_file(Path(name).expanduser())
    if not text.strip():
        raise DllmqError(f"The text of {name} is empty; give a corpus with some text in it.")
    return text


def heldout_text(name_or_path: str | os.PathLike = "wiki") -> str:
    """Text for perplexity evaluation: a named corpus's held-out split (never used for calibration)."""
    return load_corpus(name_or_path, "heldout")


def wiki_articles(split: str = "train") -> list[tuple[str, str]]:
    """(title, body) of each article of the shipped Wikipedia text."""
    articles = []
    for block in load_corpus("wiki", split).strip().split("\n\n"):
        title, _, body = block.partition("\n")
        articles.append((title, body))
    return articles


def tokenize_text(tokenizer, text: str) -> Tensor:
    """All token ids of `text` as one 1-D LongTensor, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@functools.lru_cache(maxsize=4)
def _tokenize_cached(tokenizer, text: str) -> Tensor:
    """Tokenizing a whole corpus takes seconds; a study quantizes one model many times."""
    return tokenize_text(tokenizer, text)


def calibration_windows(token_ids: Sequence[int] | Tensor, nsamples: int, seqlen: int, seed: int = 0) -> Tensor:
    """[nsamples, seqlen] windows of `token_ids` at random starts, drawn as the GPTQ reference does.

    Start i is `random.Random(seed).randint(0, n - seqlen - 1)` per window (n tokens), so windows
    may overlap and the same seed gives the same windows, identical to GPTQ's with `random.seed`.
    """
    if nsamples <= 0:
        raise DllmqError(f"nsamples must be positive, got {nsamples}.")
    if seqlen <= 0:
        raise DllmqError(f"seqlen must be positive, got {seqlen}.")
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if ids.numel() < seqlen + 1:
        raise DllmqError(
            f"The calibration text is shorter than one window ({ids.numel()} tokens, seqlen={seqlen} needs at "
            "least seqlen + 1); give a longer text or a smaller seqlen."
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[i:i + seqlen] for i in starts])


AWQ_MAX_DOCUMENT_TOKENS = 512   # AWQ's calibration skips longer documents (whatever the window length)
AWQ_SHUFFLE_SEED = 42


def document_windows(tokenizer, name_or_path: str | os.PathLike = "wiki", ndocs: int = 128,
                     seqlen: int = 512) -> Tensor:
    """Calibration windows the way AWQ's reference makes them: the corpus's documents shuffled as
    `datasets` shuffles with seed 42, each stripped and encoded with the tokenizer's special tokens,
    documents longer than 512 tokens or empty skipped, the first `ndocs` concatenated and cut into
    consecutive windows of `seqlen` tokens (the remainder dropped). Returns [n_windows, seqlen];
    n_windows depends on the text.

    Documents are the Pile's (already in AWQ's order) or a .jsonl file's records; in other text
    (the shipped Wikipedia, whose articles are far longer than 512 tokens) each non-empty line, i.e.
    each paragraph."""
    if ndocs <= 0:
        raise DllmqError(f"nsamples (documents) must be positive, got {ndocs}.")
    if seqlen <= 0:
        raise DllmqError(f"seqlen must be positive, got {seqlen}.")
    name = os.fspath(name_or_path)
    records = name == "pile" or name.endswith((".jsonl", ".jsonl.gz"))
    docs = load_corpus(name_or_path, "train").split("\n\n" if records else "\n")
    if name != "pile":   # dllmq's Pile text is in AWQ's shuffled order already
        import numpy as np
        docs = [docs[i] for i in np.random.default_rng(AWQ_SHUFFLE_SEED).permutation(len(docs))]
    picked: list[int] = []
    taken = 0
    for doc in docs:
        ids = tokenizer.encode(doc.strip())
        if not ids or len(ids) > AWQ_MAX_DOCUMENT_TOKENS:
            continue
        picked.extend(ids)
        taken += 1
        if taken == ndocs:
            break
    n = len(picked) // seqlen
    if n == 0:
        raise DllmqError(f"The calibration text has too few documents of at most {AWQ_MAX_DOCUMENT_TOKENS} tokens to "
                         f"fill one window of {seqlen} tokens; give a text with shorter documents or a smaller seqlen.")
    return torch.tensor(picked[:n * seqlen], dtype=torch.long).reshape(n, seqlen)


def _check_mask(mask_ratio: float, mask_token_id: int | None) -> None:
    if not 0.0 < mask_ratio <= 1.0:
        raise DllmqError(f"mask_ratio must be in (0, 1], got {mask_ratio}.")
    if mask_token_id is None:
        raise DllmqError("Masked calibration needs the model's mask token id; pass mask_token_id.")


def mask_windows(windows: Tensor, mask_ratio: float, mask_token_id: int, seed: int = 0) -> Tensor:
    """A copy of `windows` with round(mask_ratio * seqlen) positions per row (at least one), chosen
    at random with `seed`, replaced by `mask_token_id`: the inputs a dLLM sees while denoising."""
    _check_mask(mask_ratio, mask_token_id)
    rows, seqlen = windows.shape
    k = max(1, round(mask_ratio * seqlen))
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(rows, seqlen, generator=generator)
    positions = scores.argsort(dim=1)[:, :k]
    out = windows.clone()
    out.scatter_(1, positions, mask_token_id)
    return out


def calibration_set(tokenizer, name_or_path: str | os.PathLike = "wiki", nsamples: int = 128, seqlen: int = 2048,
                    seed: int = 0, *, mask_ratio: float | None = None, mask_token_id: int | None = None) -> Tensor:
    """[nsamples, seqlen] calibration token ids from a corpus's train split (or a file).

    Clean text by default, as in the study. With `mask_ratio`, that fraction of each window's
    positions is replaced by `mask_token_id` (seeded), for masked calibration of a dLLM.
    """
    if mask_ratio is not None:
        _check_mask(mask_ratio, mask_token_id)
    windows = calibration_windows(_tokenize_cached(tokenizer, load_corpus(name_or_path, "train")), nsamples, seqlen, seed)
    if mask_ratio is None:
        return windows
    return mask_windows(windows, mask_ratio, mask_token_id, seed)


def chat_windows(tokenizer, path: str | os.PathLike, nsamples: int = 128, seqlen: int = 2048,
                 seed: int = 0) -> tuple[Tensor, Tensor]:
    """Instruct-style calibration: (ids [n, seqlen], response [n, seqlen] bool) from a .jsonl file with
    "prompt" and "response" fields per line. Records are shuffled with `seed` and the first `nsamples`
    taken (fewer if the file has fewer); each is the user turn in the tokenizer's chat template (the
    prompt, plain when it has none) followed by the response and EOS, cut to `seqlen` and padded with
    EOS, which counts as response as in LLaDA's SFT. `response` is False on the prompt: a masked
    calibration never masks it."""
    path = Path(path).expanduser()
    if _file_kind(path) != ".jsonl":
        raise DllmqError(f"Chat calibration reads a .jsonl file with \"prompt\" and \"response\" fields; {path} is not "
                         ".jsonl.")
    records = []
    for number, record in _jsonl_records(path):
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("prompt", "response")):
            raise DllmqError(f"Line {number} of {path} lacks a string \"prompt\" or \"response\"; chat calibration "
                             "needs both on every line.")
        records.append(record)
    if not records:
        raise DllmqError(f"{path} has no records; give one JSON object with \"prompt\" and \"response\" per line.")
    random.Random(seed).shuffle(records)
    eos = tokenizer.eos_token_id
    rows, responses = [], []
    for record in records[:nsamples]:
        if getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": record["prompt"]}], tokenize=False,
                                                   add_generation_prompt=True)
        else:
            prompt = record["prompt"] + "\n"
        p = tokenizer.encode(prompt, add_special_tokens=False)
        r = tokenizer.encode(record["response"], add_special_tokens=False) + [eos]
        if len(p) >= seqlen:
            raise DllmqError(f"A prompt in {path} has {len(p)} tokens, which leaves no response in a window of {seqlen}; "
                             "use a longer --seqlen or shorter prompts.")
        row = (p + r)[:seqlen]
        rows.append(row + [eos] * (seqlen - len(row)))
        responses.append([False] * len(p) + [True] * (seqlen - len(p)))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(responses, dtype=torch.bool)


def eval_token_ids(tokenizer, name_or_path: str | os.PathLike = "wiki") -> Tensor:
    """1-D token ids of the held-out text, to be cut into non-overlapping perplexity windows
    (e.g. with `dllmq.diffusion.perplexity.split_windows`)."""
    return tokenize_text(tokenizer, heldout_text(name_or_path))
