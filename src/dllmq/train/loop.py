"""Training dllmq-tiny: LLaDA's masked-diffusion pre-training and its SFT, seeded and resumable; its
autoregressive twin dllmq-tiny-ar; and the Dream twin dllmq-tiny-dream adapted from the AR twin.

Pre-training (stage `base`): packed sequences of BOS + document + EOS; per row t ~ U(0, 1],
p = (1 - eps) t + eps, each token masked with probability p, loss = sum over masked tokens of
CE / p, divided by (batch x sequence length), as LLaDA's reference does.

SFT (stage `instruct`): chat-formatted (prompt, response) pairs; the prompt is never masked, the
response (with <|eot_id|> and EOS padding) is, and each row's loss is divided by its response
length (LLaDA's SFT). Every `pretrain_every`-th step is a pre-training step, so plain-text
abilities survive. `sft_batches` "by_kind" (the default) fills each SFT batch with one kind of pair, so
a math row (a 1-3 digit answer) is padded to another math row's width, not a code row's: in "mixed"
batches (dllmq-tiny-instruct v1) the answer digits carried ~1.4 % of a math row's loss, the EOS padding
the rest. `sft_format` "plain" writes the pairs as the mini benchmark asks a base model (`Question: ...
Answer:` + ` 77`), for a math mid-training of a base model that stays a base model. `sft_min_response`
(default 8) pads every response with EOS to at least that many tokens, so one-kind math batches still show
the model the EOS tail that fills the rest of a generation window.

AR (stage `ar`): the base stage's batches exactly (same seed, same rows at every step), a causal
Llama of the same size, and next-token prediction: mean CE of token i+1 given tokens 0..i over
every position of every row. The objective is the only difference from the base stage.

Dream (stage `dream`): the AR twin in --init copied into Dream's architecture (dllmq.train.dream_twin),
then the base stage's batches and loss read through Dream's shifted logits: masked token i is scored by
the logits at position i-1 (the AR twin's next-token reading, which the adaptation keeps), the first
token of a row is never masked (no position predicts it), and the sum is divided by batch x (L - 1).
The SFT of stage `instruct` reads a Dream base the same way. Both losses take `shift` from
model.family.shift_logits, so LLaDA models are trained exactly as before.

A run directory holds `checkpoint.pt` (model, optimizer, step, RNG states; written atomically),
`log.jsonl` (the loss curve), `tokenizer/` and, when done, `final/` (bf16 weights + tokenizer).
Running the same command again resumes from the checkpoint.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from dllmq.atomic import atomic_directory, atomic_path, write_text_atomic
from dllmq.errors import DllmqError
from dllmq.models.loading import load_checkpoint, load_tokenizer, save_model
from dllmq.models.modeling import TransformerLM, init_weights
from dllmq.models.registry import build_model, parse_model_config
from dllmq.train import corpus
from dllmq.train.config import RUNTIME_SETTINGS, TrainConfig, stored_settings, tiny_model_config
from dllmq.train.dream_twin import dream_from_llama
from dllmq.train.export import export_model
from dllmq.train.tokenizer import train_tokenizer

log = logging.getLogger(__name__)

EPS = 1e-3


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

class Batches:
    """Seeded batch maker: the batch of step s depends only on (seed, s), so resuming is exact."""

    def __init__(self, cfg: TrainConfig, tokenizer, wiki_docs: list[str], python_docs: list[str]):
        self.cfg, self.tok = cfg, tokenizer
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.mask_id = tokenizer.mask_token_id
        self.wiki = [self.encode(d) for d in wiki_docs]
        self.python = [self.encode(d) for d in python_docs]
        self.wiki_docs = wiki_docs

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False, verbose=False)["input_ids"]

    def rng(self, step: int, salt: int = 0) -> random.Random:
        return random.Random((self.cfg.seed * 1_000_003 + step) * 7 + salt)

    def document(self, source: str, rng: random.Random, room: int) -> list[int]:
        if source in ("wiki", "python"):
            docs = self.wiki if source == "wiki" else self.python
            doc = docs[rng.randrange(len(docs))]
            length = min(room, rng.randint(64, 192))  # a chunk, so the mixture weights mean tokens
            if len(doc) > length:
                start = rng.randrange(len(doc) - length + 1)
                return doc[start:start + length]
            return [self.bos, *doc, self.eos]
        if source == "math":
            lines = [corpus.math_item(rng, heldout=False).text for _ in range(rng.randint(1, 6))]
            return [self.bos, *self.encode("\n".join(lines)), self.eos]
        item = corpus.code_item(rng, heldout=False)
        return [self.bos, *self.encode(item.text), self.eos]

    def pretrain(self, step: int) -> torch.Tensor:
        rng = self.rng(step)
        names = list(self.cfg.mix)
        weights = [self.cfg.mix[n] for n in names]
        rows = []
        for _ in range(self.cfg.batch_size):
            row: list[int] = []
            while len(row) < self.cfg.seq_len:
                row += self.document(rng.choices(names, weights)[0], rng, self.cfg.seq_len - len(row))
            rows.append(row[:self.cfg.seq_len])
        return torch.tensor(rows, dtype=torch.long)

    def sft_kind(self, rng: random.Random) -> str:
        kinds = list(self.cfg.sft_mix)
        return rng.choices(kinds, [self.cfg.sft_mix[k] for k in kinds])[0]

    def sft(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, L], response mask [B, L]); rows padded with EOS to the widest row (and every response to at
        least `sft_min_response` tokens), the padding counting as response (LLaDA's SFT). `sft_batches`
        "by_kind": one kind per batch; "mixed": a kind per row.
        `sft_format` "chat": the pair in the chat template; "plain": as the mini benchmark prompts a base model."""
        rng = self.rng(step, salt=1)
        kind = self.sft_kind(rng) if self.cfg.sft_batches == "by_kind" else None
        plain = self.cfg.sft_format == "plain"
        rows, starts = [], []
        for _ in range(self.cfg.batch_size):
            prompt, response = sft_example(kind or self.sft_kind(rng), rng, self.wiki_docs, plain)
            if plain:  # the text a base model is prompted with, then its continuation and EOS
                p, r = [self.bos, *self.encode(prompt)], self.encode(response) + [self.eos]
            else:
                p = self.encode(self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                             add_generation_prompt=True))
                r = self.encode(response) + [self.tok.convert_tokens_to_ids("<|eot_id|>"), self.eos]
            rows.append((p + r)[:self.cfg.seq_len])
            starts.append(min(len(p), self.cfg.seq_len - 1))
        width = min(self.cfg.seq_len, max(max(len(r) for r in rows),
                                          max(s + self.cfg.sft_min_response for s in starts)))
        ids = torch.full((len(rows), width), self.eos, dtype=torch.long)
        response = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (r, s) in enumerate(zip(rows, starts)):
            ids[i, :len(r)] = torch.tensor(r)
            response[i, s:] = True
        return ids, response


def sft_example(kind: str, rng: random.Random, wiki_docs: list[str], plain: bool = False) -> tuple[str, str]:
    """A (prompt, response) pair of one of the three kinds, from the training space: a user turn and the
    assistant's answer, or (`plain`) the text a base model is given and its continuation, as the mini
    benchmark asks them. Both draw the same numbers from `rng`."""
    if kind == "math":
        item = corpus.math_item(rng, heldout=False)
        return (item.prompt, f" {item.answer}") if plain else (item.question, str(item.answer))
    if kind == "code":
        item = corpus.code_item(rng, heldout=False)
        body = item.body.rstrip("\n")
        return (item.prompt.rstrip("\n"), "\n" + body) if plain else (code_instruction(item.prompt), body)
    doc = wiki_docs[rng.randrange(len(wiki_docs))]
    words = doc.split(" ")
    start = rng.randrange(max(1, len(words) - 80))
    n = rng.randint(25, 60)
    passage, continuation = " ".join(words[start:start + n]), " ".join(words[start + n:start + n + 12])
    return (passage, " " + continuation) if plain else ("Continue the text: " + passage, continuation)


def code_instruction(prompt: str) -> str:
    """The user turn asking an instruct model to write a function body (used in training and in the benchmark)."""
    return "Write the body of this Python function.\n" + prompt


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------

def forward_noise(ids: torch.Tensor, mask_id: int, generator: torch.Generator,
                  allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLaDA's forward process: per row t ~ U(0,1], p = (1-eps) t + eps; mask each allowed token with p."""
    b, length = ids.shape
    t = torch.rand(b, generator=generator)
    p = ((1 - EPS) * t + EPS)[:, None].expand(b, length)
    masked = torch.rand(b, length, generator=generator) < p
    if allowed is not None:
        masked &= allowed
    return ids.masked_fill(masked, mask_id), masked, p


def maskable(ids: torch.Tensor, shift: int) -> torch.Tensor:
    """The positions the forward process may mask: all, or (shift 1, Dream) all but the first, which no
    position predicts when token i is read at position i-1."""
    allowed = torch.ones_like(ids, dtype=torch.bool)
    allowed[:, :shift] = False
    return allowed


def masked_ce(model: TransformerLM, noisy: torch.Tensor, ids: torch.Tensor, masked: torch.Tensor,
              p: torch.Tensor, shift: int) -> torch.Tensor:
    """CE / p of each masked token, read where the model predicts it: at its own position (LLaDA), or at
    the one before (shift 1: Dream's shifted logits, which keep the AR twin's next-token reading)."""
    logits = model(noisy)
    if shift:
        logits, ids, masked, p = logits[:, :-shift], ids[:, shift:], masked[:, shift:], p[:, shift:]
    return F.cross_entropy(logits[masked].float(), ids[masked], reduction="none") / p[masked]


def pretrain_loss(model: TransformerLM, ids: torch.Tensor, mask_id: int, generator: torch.Generator) -> torch.Tensor:
    """LLaDA's masked-diffusion loss (1/t weighting, per token of the batch); for Dream (shifted logits)
    over the L-1 positions that can be masked and predicted."""
    shift = int(model.family.shift_logits)
    noisy, masked, p = forward_noise(ids, mask_id, generator, allowed=maskable(ids, shift) if shift else None)
    return masked_ce(model, noisy, ids, masked, p, shift).sum() / ids[:, shift:].numel()


def sft_loss(model: TransformerLM, ids: torch.Tensor, response: torch.Tensor, mask_id: int,
             generator: torch.Generator) -> torch.Tensor:
    shift = int(model.family.shift_logits)
    response = response & maskable(ids, shift)  # a response always follows a prompt of at least one token
    noisy, masked, p = forward_noise(ids, mask_id, generator, allowed=response)
    ce = masked_ce(model, noisy, ids, masked, p, shift)
    lengths = response.sum(1, keepdim=True).float().expand_as(response)[:, shift:][masked[:, shift:]]
    return (ce / lengths).sum() / ids.shape[0]


def causal_loss(model: TransformerLM, ids: torch.Tensor) -> torch.Tensor:
    """Next-token prediction: mean CE of ids[:, i+1] from the logits at position i (a causal model sees 0..i)."""
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())


def pretrain_objective(cfg: TrainConfig, model: TransformerLM, ids: torch.Tensor, mask_id: int,
                       generator: torch.Generator) -> torch.Tensor:
    """The loss of a pre-training batch: next-token CE for the AR twin, the masked-diffusion loss otherwise
    (LLaDA's, read through the shifted logits for the Dream twin)."""
    if cfg.stage == "ar":
        return causal_loss(model, ids)
    return pretrain_loss(model, ids, mask_id, generator)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at `steps`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------

def build_or_load_tokenizer(cfg: TrainConfig, out: Path, wiki_docs, python_docs):

    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(tok_dir))
    if cfg.stage in ("instruct", "dream") and not cfg.tokenizer:  # the model it starts from has one
        tok = load_tokenizer(Path(cfg.init)) if cfg.init else None  # quietly: transformers does not know Dream
        if tok is None:
            raise DllmqError(f"The {cfg.stage} stage needs --init DIR, the directory of the model it starts from "
                             "(config.json, weights, tokenizer).")
        return tok
    if cfg.tokenizer:  # copied into the run, so it resumes (and exports) from its own files
        if not (Path(cfg.tokenizer) / "tokenizer.json").is_file():
            raise DllmqError(f"{cfg.tokenizer} has no tokenizer.json; point --tokenizer at a model directory.")
        tok = load_tokenizer(Path(cfg.tokenizer))  # quietly: a llada config.json beside it puzzles transformers
    else:
        rng = random.Random(cfg.seed)
        texts = list(wiki_docs) + list(python_docs)
        texts += ["\n".join(corpus.math_item(rng, False).text for _ in range(5)) for _ in range(cfg.tokenizer_items)]
        texts += [corpus.code_item(rng, False).text for _ in range(cfg.tokenizer_items)]
        tok = train_tokenizer(texts, cfg.vocab_size)
    with atomic_directory(tok_dir, overwrite=True) as tmp:  # no tokenizer.json: whatever is there is incomplete
        tok.save_pretrained(str(tmp))
    return AutoTokenizer.from_pretrained(str(tok_dir))


def make_model(cfg: TrainConfig, tokenizer) -> TransformerLM:
    if cfg.stage == "instruct":
        if not cfg.init or not (Path(cfg.init) / "config.json").is_file():
            raise DllmqError("The instruct stage needs --init DIR, the base model directory (with config.json).")
        return load_checkpoint(Path(cfg.init), torch.float32).train()
    raw = tiny_model_config(cfg, tokenizer)
    if cfg.stage == "dream":  # the AR twin's weights, in Dream's architecture
        return dream_from_llama(load_checkpoint(Path(cfg.init), torch.float32), raw).train()
    model = build_model(parse_model_config(raw))
    init_weights(model, seed=cfg.seed)
    with torch.no_grad():  # norms start at one (init_weights jitters them for tests)
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0)
        # scaled init of residual outputs (GPT-2 style) for stable small-batch training
        for block in model.get_blocks():
            for name in model.family.residual_writers:
                block.get_submodule(name).weight.mul_(1 / math.sqrt(2 * cfg.n_layers))
    return model.train()


def train(cfg: TrainConfig, minutes: float | None = None, export: str | None = None) -> Path:
    """Run (or resume) a training run; returns the run directory. Stops after `minutes` of wall time
    (with a checkpoint) if given; when the schedule is complete, writes `final/` and, if `export`
    names a directory, copies the final model there."""
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, minutes, export)
    finally:
        torch.set_num_threads(previous_threads)


def _train(cfg: TrainConfig, minutes: float | None, export: str | None) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "train_config.json"
    if cfg_path.is_file():
        saved = stored_settings(json.loads(cfg_path.read_text()))
        defaults, current = asdict(TrainConfig()), asdict(cfg)
        diff = sorted(k for k in current if k not in RUNTIME_SETTINGS and saved.get(k, defaults[k]) != current[k])
        if diff:
            raise DllmqError(f"{out} holds a run with other settings ({', '.join(diff)}); use another --out "
                             "or the same settings to resume it.")
    else:
        write_text_atomic(cfg_path, json.dumps(asdict(cfg), indent=2))

    started = time.time()
    wiki_docs = corpus.wiki_documents("train")[:cfg.max_wiki_docs or None]
    python_docs = corpus.python_documents()[:cfg.max_python_docs or None]
    tokenizer = build_or_load_tokenizer(cfg, out, wiki_docs, python_docs)
    batches = Batches(cfg, tokenizer, wiki_docs, python_docs)
    model = make_model(cfg, tokenizer)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    generator = torch.Generator().manual_seed(cfg.seed)
    step, elapsed_before = 0, 0.0
    ckpt = out / "checkpoint.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)  # never unpickle
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step, elapsed_before = state["step"], state.get("elapsed", 0.0)
        log.info("resumed %s at step %d", out, step)

    def save_checkpoint():
        with atomic_path(ckpt) as tmp:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "generator": generator.get_state(), "elapsed": elapsed_before + time.time() - t0,
                        "torch_rng": torch.get_rng_state()}, tmp)

    mask_id = tokenizer.mask_token_id
    log_file = (out / "log.jsonl").open("a")
    t0 = time.time()
    tokens, window_loss, window_n, last = 0, 0.0, 0, time.time()
    while step < cfg.steps:
        lr = learning_rate(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        pretrain_step = cfg.stage != "instruct" or (cfg.pretrain_every and step % cfg.pretrain_every == 0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
            if pretrain_step:
                ids = batches.pretrain(step)
                loss = pretrain_objective(cfg, model, ids, mask_id, generator)
            else:
                ids, response = batches.sft(step)
                loss = sft_loss(model, ids, response, mask_id, generator)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += ids.numel()
        window_loss += float(loss.detach())
        window_n += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.time()
            record = {"step": step, "loss": round(window_loss / window_n, 4), "lr": round(lr, 6),
                      "grad_norm": round(float(norm), 3), "tokens_per_s": round(tokens / (now - last), 1),
                      "elapsed_s": round(elapsed_before + now - t0, 1), "kind": "pretrain" if pretrain_step else "sft"}
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            log.info("step %d loss %.4f lr %.2e %.0f tok/s", step, record["loss"], lr, record["tokens_per_s"])
            tokens, window_loss, window_n, last = 0, 0.0, 0, now
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint()
        if minutes is not None and time.time() - started > minutes * 60 and step < cfg.steps:
            save_checkpoint()
            log.info("stopping after %.1f minutes at step %d; run the same command again to resume", minutes, step)
            log_file.close()
            return out
    log_file.close()
    total_s = elapsed_before + time.time() - t0
    final = out / "final"
    if not (final / "config.json").is_file():
        export_final(model, tokenizer, final, cfg, total_s)
    if export:

        export_model(out, Path(export))
    return out


def export_final(model: TransformerLM, tokenizer, final: Path, cfg: TrainConfig, total_s: float) -> None:

    model = copy.deepcopy(model).eval().to(torch.bfloat16)
    extra = {"dllmq_training": {"stage": cfg.stage, "steps": cfg.steps, "train_seconds": round(total_s, 1),
                                "chat": cfg.stage == "instruct" and cfg.sft_format == "chat"}}
    save_model(model, tokenizer, final, overwrite=True, extra_config=extra)
