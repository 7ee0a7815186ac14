"""The mini benchmark: the study's three categories in miniature, offline, fast on a CPU.

- `mini_general` (400 items): LAMBADA-style cloze on held-out Wikipedia articles. The passage is
  cut before a word that occurred earlier in it; four choices (chance 25 %). Scored by LLaDA's
  Monte Carlo log-likelihood of each choice given the passage (`mc_loglikelihood`; mc_num=1 for a
  one-token choice, where it is exact, else MC_NUM draws); the highest wins (`acc`). Also reported:
  `acc_norm`, lm-eval's length-normalised variant (the log-likelihood divided by the choice's length in
  characters; the highest wins). Always plain text.
- `mini_math` (400 items): arithmetic and short word problems; diffusion generation, exact match
  of the first integer in the answer.
- `mini_code` (301 items): complete a small Python function from its signature and docstring;
  pass@1 by running held-out asserts in dllmq's code-execution sandbox (`evaluate.sandbox`; asking for
  mini_code is the opt-in to run the model's code there).

Prompts. Base models get `Question: ... Answer:` (math) and the function's signature + docstring
(code). Chat models (config `dllmq_training.chat`, or `chat=True`) get the question, or an
instruction plus the function, as a user turn in the chat template, and answer in the assistant turn.

Generation settings (LLaDA sampler, greedy, low-confidence remasking, one token per step):
math gen_length 8 = steps, block_length 4; code gen_length 32 = steps, block_length 8 (base
and chat alike); `evaluate_mini(generation=...)` overrides them (benchmarks/steps_study.py varies the
steps and the remasking). Likelihood: mc_num 1 for one-token choices (exact), MC_NUM = 4 otherwise.

Causal models (the AR twin dllmq-tiny-ar) take the same items and token budgets through the causal
paths: exact log-likelihood of each choice, greedy left-to-right generation of gen_length tokens
(stopping at EOS). Dream models (dllmq-tiny-dream) take them through Dream's paths: the likelihood
and Dream's sampler (gen_length tokens in `steps` steps, greedy, entropy order; no blocks) read the
logits shifted by one.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from importlib import resources

import torch
from tqdm.auto import tqdm

from dllmq.diffusion import default_sampler, generate_text
from dllmq.diffusion.kv_cache import check_kv_cache
from dllmq.diffusion.likelihood import causal_loglikelihood, mc_loglikelihood_many
from dllmq.errors import DllmqError
from dllmq.evaluate.sandbox import run_programs, with_limits
from dllmq.quant.qlinear import keep_dequantized_weights

TASKS = ("mini_general", "mini_math", "mini_code")
ALIASES = {"mini": TASKS}
CHANCE = {"mini_general": 0.25, "mini_math": 0.0, "mini_code": 0.0}
MC_NUM = 4
ITEMS_PER_STACK = 50  # mini_general items whose likelihood batches may share forwards
# Chosen on dev items from the *training* key space (not the benchmark): small semi-autoregressive
# blocks avoid the repeated tokens ("return return") that a weak model writes into wide blocks.
GEN_SETTINGS = {
    ("mini_math", False): dict(gen_length=8, steps=8, block_length=4),
    ("mini_math", True): dict(gen_length=8, steps=8, block_length=4),
    ("mini_code", False): dict(gen_length=32, steps=32, block_length=8),
    ("mini_code", True): dict(gen_length=32, steps=32, block_length=8),
}
CODE_INSTRUCTION = "Write the body of this Python function.\n"
_INT = re.compile(r"-?\d+")


def expand_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Task names from a list or a comma-separated string; `mini` means all three."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    out: list[str] = []
    for t in tasks:
        for name in ALIASES.get(t, (t,)):
            if name not in TASKS:
                raise DllmqError(f"Unknown mini task {name!r}; use {', '.join(TASKS)} or mini.")
            if name not in out:
                out.append(name)
    return out


def load_items(task: str, limit: int | None = None) -> list[dict]:
    """The shipped held-out items of a task (the first `limit` of them; the files are pre-shuffled)."""
    if task not in TASKS:
        raise DllmqError(f"Unknown mini task {task!r}; use {', '.join(TASKS)}.")
    text = resources.files("dllmq.evaluate").joinpath("mini_data", f"{task}.jsonl").read_text(encoding="utf-8")
    items = [json.loads(line) for line in text.splitlines() if line.strip()]
    return items if limit is None else items[:limit]


def is_chat_model(model) -> bool:
    raw = getattr(model.config, "raw", {}) or {}
    return bool((raw.get("dllmq_training") or {}).get("chat", False))


def summarize(correct: Sequence[bool], task: str) -> dict:
    """{"acc", "stderr", "n", "chance"} of a task from its items' outcomes, in item order (what
    evaluate_mini reports; the study merges the outcomes of a task's shards through it)."""
    n = len(correct)
    acc = sum(correct) / n if n else float("nan")
    stderr = math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else float("nan")
    return {"acc": acc, "stderr": stderr, "n": n, "chance": CHANCE[task]}


# ---------------------------------------------------------------------------------------------
# general: multiple choice by Monte Carlo likelihood
# ---------------------------------------------------------------------------------------------

def choice_scores(model, tokenizer, items: list[dict], *, seed: int = 0, progress: bool = True) -> list[list[float]]:
    """Each item's log-likelihood of each choice given its context (summed over the choice's tokens)."""
    out = []
    for start in tqdm(range(0, len(items), ITEMS_PER_STACK), desc="mini_general", disable=not progress):
        window = items[start:start + ITEMS_PER_STACK]
        pairs, mcs = [], []
        for item in window:
            prompt = tokenizer(item["context"], add_special_tokens=True)["input_ids"]
            for choice in item["choices"]:
                answer = tokenizer(choice, add_special_tokens=False)["input_ids"]
                pairs.append((prompt, answer))
                mcs.append(1 if len(answer) == 1 else MC_NUM)
        if model.family.causal:  # exact: no draws
            scores = iter([causal_loglikelihood(model, p, a) for p, a in pairs])
        else:  # the same floats as mc_loglikelihood pair by pair (equal-length batches share a forward)
            scores = iter(mc_loglikelihood_many(model, pairs, mc_num=mcs, batch_size=mcs, seed=seed))
        out += [[next(scores) for _ in item["choices"]] for item in window]
    return out


def best_choice(scores: Sequence[float], choices: Sequence[str] | None = None) -> int:
    """The index of the highest score; with `choices`, of the highest score per character of the choice
    (lm-eval's acc_norm: the log-likelihood divided by the choice string's length), so longer choices are
    not penalised for having more tokens to pay for."""
    values = scores if choices is None else [s / max(1, len(c)) for s, c in zip(scores, choices)]
    return max(range(len(values)), key=values.__getitem__)


def score_general(model, tokenizer, items: list[dict], *, seed: int = 0, progress: bool = True,
                  chosen: list[int] | None = None, correct_norm: list[bool] | None = None) -> list[bool]:
    """Whether each item's highest-scoring choice is its label; `chosen`, when given, receives the index of
    the choice picked for each item (the per-item answer that flips are counted on), `correct_norm` whether
    the length-normalised pick (acc_norm) is the label."""
    out = []
    for item, scores in zip(items, choice_scores(model, tokenizer, items, seed=seed, progress=progress)):
        pick = best_choice(scores)
        if chosen is not None:
            chosen.append(pick)
        if correct_norm is not None:
            correct_norm.append(best_choice(scores, item["choices"]) == item["label"])
        out.append(pick == item["label"])
    return out


# ---------------------------------------------------------------------------------------------
# generation tasks
# ---------------------------------------------------------------------------------------------

def _generate(model, tokenizer, prompts: list[str], chat: bool, settings: dict, seed: int,
              batch_size: int, desc: str, progress: bool, kv_cache: str = "none", callback=None) -> list[str]:
    outputs: list[str] = []
    batches = range(0, len(prompts), batch_size)
    extra = {} if callback is None else {"callback": callback}   # the sampler's per-step callback
    sampler = default_sampler(model)  # llada, dream or causal; the last two read gen_length as max_new_tokens
    for start in tqdm(batches, desc=desc, disable=not progress):
        outputs += generate_text(model, tokenizer, prompts[start:start + batch_size], chat=chat, sampler=sampler,
                                 seed=seed, kv_cache=kv_cache, **settings, **extra)
    return outputs


def first_integer(text: str) -> int | None:
    m = _INT.search(text)
    return int(m.group(0)) if m else None


def generation_prompts(task: str, items: list[dict], chat: bool) -> list[str]:
    """The prompts of a generation task's items (before any chat template), as scoring uses them."""
    if task == "mini_math":
        return [item["question"] if chat else item["prompt"] for item in items]
    if task == "mini_code":
        if chat:
            return [CODE_INSTRUCTION + item["prompt"] for item in items]
        return [item["prompt"].rstrip("\n") for item in items]
    raise DllmqError(f"{task} is not a generation task; use mini_math or mini_code.")


def generation_settings(task: str, chat: bool, overrides: Mapping | None = None) -> dict:
    """The LLaDA settings a generation task decodes with: its preset (GEN_SETTINGS), then `overrides`
    (gen_length, steps, block_length, remasking, ...; the sampler refuses bad values)."""
    return {**GEN_SETTINGS[task, chat], **(overrides or {})}


def score_math(model, tokenizer, items: list[dict], *, chat: bool, seed: int = 0, batch_size: int = 32,
               progress: bool = True, kv_cache: str = "none", settings: Mapping | None = None,
               callback=None) -> tuple[list[bool], list[str]]:
    prompts = generation_prompts("mini_math", items, chat)
    outputs = _generate(model, tokenizer, prompts, chat, generation_settings("mini_math", chat, settings), seed,
                        batch_size, "mini_math", progress, kv_cache, callback)
    return [first_integer(o) == item["answer"] for o, item in zip(outputs, items)], outputs


def code_program(prompt: str, completion: str, chat: bool) -> str:
    """The program to test: the function's prompt plus the generated body, cut where the body ends.

    Base: the prompt ends at the docstring's closing quotes; the completion's first (indented) lines
    are the body, up to the first non-indented line. Chat: the response is the body itself.
    """
    head = prompt.rstrip("\n")
    lines = completion.split("\n")
    if chat:
        body = lines
    else:
        body = [lines[0]] if lines[0].strip() == "" else []  # the rest of the docstring line
        if lines[0].strip():
            return head + completion.split("\n")[0]  # junk after the docstring: keep it, it fails
        for line in lines[1:]:
            if line.strip() and not line.startswith((" ", "\t")):
                break
            body.append(line)
        body = body[1:]
    return head + "\n" + "\n".join(body).rstrip() + "\n"


def program_with_tests(program: str, tests: Sequence[str]) -> str:
    """The program the sandbox runs: the function, then its held-out asserts."""
    return program.rstrip("\n") + "\n\n" + "\n".join(tests) + "\n"


def score_code(model, tokenizer, items: list[dict], *, chat: bool, seed: int = 0, batch_size: int = 32,
               progress: bool = True, timeout: float = 5.0, kv_cache: str = "none", settings: Mapping | None = None,
               callback=None) -> tuple[list[bool], list[str]]:
    prompts = generation_prompts("mini_code", items, chat)
    outputs = _generate(model, tokenizer, prompts, chat, generation_settings("mini_code", chat, settings), seed,
                        batch_size, "mini_code", progress, kv_cache, callback)
    programs = [code_program(item["prompt"], o, chat) for item, o in zip(items, outputs)]
    results = run_programs([program_with_tests(p, item["tests"]) for p, item in zip(programs, items)],
                           allow_code_execution=True, limits=with_limits(timeout_s=timeout, cpu_s=max(1, int(timeout))),
                           workers=2, desc="mini_code sandbox", progress=progress)
    return [r.passed for r in results], programs


# ---------------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_mini(model, tokenizer, tasks: str | Sequence[str] = TASKS, limit: int | None = None, seed: int = 0,
                  progress: bool = True, chat: bool | None = None, batch_size: int = 32,
                  return_samples: bool = False, shard: tuple[int, int] | None = None,
                  kv_cache: str = "none", generation: Mapping | None = None, step_callback=None) -> dict:
    """Per task {"acc", "stderr", "n", "chance"} on the shipped held-out items.

    `limit` takes the first items of each task (a fixed subset); `seed` seeds the Monte Carlo draws
    and generation; `chat` None means: the chat template when the model's config marks it as a chat
    model (dllmq-tiny-instruct). With `return_samples`, each task also lists its per-item outcomes:
    {"id", "correct", "answer"} (answer: the chosen option's index, the extracted integer, or the program
    tested) and the raw "output" of generation tasks.
    `shard` (start, stop): only items[start:stop] of the first `limit` (the study's units on Ray); a
    generation task's items come out the same in a shard as in the whole task when `start` is a
    multiple of `batch_size` (the batches, and so their padding, are then the same).
    `kv_cache` "prefix" / "dual": the generation tasks decode approximately with the block-wise K/V
    cache (dllmq.diffusion.kv_cache; never the study's setting); "none" is exact.
    `generation` overrides the generation tasks' LLaDA settings (steps, gen_length, block_length, remasking;
    `generation_settings`); `step_callback(step, state)` is handed to the sampler (e.g. a
    dllmq.diffusion.trajectory.StepRecorder), its step counting from 1 in every batch.
    """
    if tokenizer is None:
        raise DllmqError("The mini benchmark needs the model's tokenizer; load a checkpoint that ships one.")
    check_kv_cache(kv_cache)
    chat = is_chat_model(model) if chat is None else chat
    was_training = model.training
    model.eval()
    results = {}
    try:
        with keep_dequantized_weights(model):  # fake-quantized weights dequantized once, not per forward
            for task in expand_tasks(tasks):
                items = load_items(task, limit)
                if shard is not None:
                    items = items[shard[0]:shard[1]]
                samples = None
                correct_norm: list[bool] = []
                if task == "mini_general":
                    picks: list[int] = []
                    correct = score_general(model, tokenizer, items, seed=seed, progress=progress, chosen=picks,
                                            correct_norm=correct_norm)
                    answers = [str(k) for k in picks]
                elif task == "mini_math":
                    correct, samples = score_math(model, tokenizer, items, chat=chat, seed=seed, batch_size=batch_size,
                                                  progress=progress, kv_cache=kv_cache, settings=generation,
                                                  callback=step_callback)
                    answers = [None if (v := first_integer(o)) is None else str(v) for o in samples]
                else:
                    correct, samples = score_code(model, tokenizer, items, chat=chat, seed=seed, batch_size=batch_size,
                                                  progress=progress, kv_cache=kv_cache, settings=generation,
                                                  callback=step_callback)
                    answers = list(samples)
                results[task] = summarize(correct, task)
                if correct_norm:  # mini_general: also the length-normalised accuracy (lm-eval's acc_norm)
                    norm = summarize(correct_norm, task)
                    results[task].update(acc_norm=norm["acc"], acc_norm_stderr=norm["stderr"])
                if return_samples:
                    results[task]["samples"] = [{"id": it["id"], "correct": c, "answer": a,
                                                 **({"output": s} if samples else {})}
                                                for it, c, a, s in zip(items, correct, answers,
                                                                       samples or [None] * len(items))]
    finally:
        model.train(was_training)
    return results
