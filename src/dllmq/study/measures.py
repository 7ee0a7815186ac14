"""The per-cell measures against the model's own full precision, as the study runner stores them.

- `FPReference`: what the FP model says on the measure windows (dllmq.diffusion.divergence) and, for
  the trajectory measure, FP's denoising trajectories on the first items of each mini generation task.
  Built once per (model, seed, dtype, device, settings) and kept by `ReferenceCache` for the run; every
  quantized cell of the model compares itself with it, so FP runs once, not once per cell.
- `measure_rows`: the `measures` rows of one cell (per-window KL and top-1 agreement by mask ratio, the
  ELBO NLL of the cell and of FP; the trajectory flip rate by step), each with its per-unit values.
- `mini_items` / `harness_items`: the per-item answers of a task (the `items` rows), from which the
  report counts flips (right->wrong, wrong->right) against FP's items.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from dllmq.data.text import eval_token_ids
from dllmq.diffusion.divergence import Reference, build_reference, compare, measure_windows
from dllmq.diffusion.text import encode_prompts, format_prompt
from dllmq.diffusion.trajectory import Trajectory, record_trajectory, teacher_forced_flips
from dllmq.evaluate.mini import GEN_SETTINGS, generation_prompts, is_chat_model, load_items
from dllmq.study.config import MeasureSettings

log = logging.getLogger(__name__)

TRAJECTORY_TASKS = ("mini_math", "mini_code")


@dataclass
class FPReference:
    divergence: Reference
    setup: str                                    # identity of the windows and masks
    trajectories: dict[str, Trajectory] = field(default_factory=dict)
    seconds: float = 0.0                          # what building it cost


def _setup_hash(ref: Reference, settings: MeasureSettings, seed: int) -> str:
    h = hashlib.sha256()
    h.update(ref.windows.numpy().tobytes())
    h.update(repr((settings.key_dict(), seed)).encode())
    return h.hexdigest()[:16]


def build_fp_reference(model, tokenizer, settings: MeasureSettings, seed: int, *, chat: bool | None = None,
                       tasks: Sequence[str] = (), limit: int | None = None) -> FPReference:
    """Run the FP model over the measure windows (and trajectories of the first min(trajectory, limit) items
    of `tasks`' generation tasks)."""
    start = time.perf_counter()
    windows = measure_windows(eval_token_ids(tokenizer, settings.text), settings.windows, settings.seqlen)
    ref = build_reference(model, windows, ratios=settings.ratios, elbo_mc=settings.elbo_mc, seed=seed,
                          batch_size=settings.batch_size)
    trajectories = {}
    if settings.trajectory:
        chat = is_chat_model(model) if chat is None else chat
        for task in tasks:
            if task in TRAJECTORY_TASKS:
                items = load_items(task, min(settings.trajectory, limit or settings.trajectory))
                texts = [format_prompt(tokenizer, p, chat) for p in generation_prompts(task, items, chat)]
                ids, mask = encode_prompts(tokenizer, texts, chat=chat)
                trajectories[task] = record_trajectory(model, ids, None if mask.all() else mask, seed=seed,
                                                       **GEN_SETTINGS[task, chat])
    return FPReference(ref, _setup_hash(ref, settings, seed), trajectories, time.perf_counter() - start)


class ReferenceCache:
    """FP references of this run, by (model, seed, dtype, device, settings): built at most once each."""

    def __init__(self):
        self._refs: dict[tuple, FPReference] = {}

    def get(self, key: tuple) -> FPReference | None:
        return self._refs.get(key)

    def put(self, key: tuple, ref: FPReference) -> None:
        # one model's reference at a time: the grid runs a model's cells together, and an 8B model's
        # reference is large
        self._refs = {key: ref}


def _row(measure: str, param: str, units: Sequence[float], setup: str, seconds: float) -> dict:
    units = [float(u) for u in units]
    finite = [u for u in units if u == u]
    return {"measure": measure, "param": param, "value": sum(finite) / len(finite) if finite else None,
            "n": len(units), "units": units, "setup": setup, "seconds": seconds}


def ratio_param(ratio: float) -> str:
    return f"{ratio:g}"


def measure_rows(model, ref: FPReference) -> list[dict]:
    """The measures rows of one cell against FP's reference."""
    start = time.perf_counter()
    div = compare(model, ref.divergence)
    seconds = time.perf_counter() - start
    rows = []
    for r in ref.divergence.ratios:
        rows.append(_row("kl", ratio_param(r), div.kl[r], ref.setup, seconds))
        rows.append(_row("top1", ratio_param(r), div.top1[r], ref.setup, seconds))
    if ref.divergence.elbo_masks.shape[1]:
        rows.append(_row("elbo_nll", "", div.nll, ref.setup, seconds))
        rows.append(_row("elbo_nll_fp", "", div.nll_ref, ref.setup, seconds))
    for task, traj in ref.trajectories.items():
        start = time.perf_counter()
        flips = teacher_forced_flips(model, traj)       # [items][steps] 0/1
        seconds = time.perf_counter() - start
        steps = max((len(f) for f in flips), default=0)
        per_item = [sum(f) / len(f) for f in flips if f]
        rows.append(_row("traj_flip", task, per_item, ref.setup, seconds))
        for s in range(steps):
            rows.append(_row("traj_flip_step", f"{task}:{s + 1}", [f[s] for f in flips if len(f) > s], ref.setup,
                             seconds))
    return rows


# ----------------------------------------------------------------------------- per-item answers
def mini_items(task: str, samples: Sequence[Mapping]) -> list[dict]:
    """items rows of a mini task from evaluate_mini's samples."""
    return [{"task": task, "item": s["id"], "answer": s.get("answer"), "correct": bool(s["correct"])}
            for s in samples]


def _harness_answer(row: Mapping) -> str | None:
    resps = row.get("filtered_resps")
    if not isinstance(resps, (list, tuple)) or not resps:
        return None
    first = resps[0]
    if isinstance(first, (list, tuple)) and first and isinstance(first[0], (int, float)):
        # multiple choice: one (loglikelihood, is_greedy) per choice -> the chosen choice's index
        scores = [float(r[0]) for r in resps]
        return str(max(range(len(scores)), key=scores.__getitem__))
    if isinstance(first, (list, tuple)):
        first = first[0] if first else ""
    return str(first)


def harness_items(task: str, samples: Sequence[Mapping], metric: str) -> list[dict]:
    """items rows of a harness task from lm-eval's logged samples: the response the metric was computed on
    (the metric's filter) and the metric's value for the item. `metric` is 'name' or 'name,filter'."""
    name, _, filt = metric.partition(",")
    out, seen = [], set()
    for row in samples:
        if filt and row.get("filter") not in (None, filt):
            continue
        value = row.get(name)
        if value is None and isinstance(row.get("metrics"), Mapping):
            value = row["metrics"].get(name)
        if not isinstance(value, (int, float, bool)):
            continue
        key = f"{row.get('subtask', task)}/{row.get('doc_id')}"
        if key in seen:
            continue
        seen.add(key)
        out.append({"task": task, "item": key, "answer": _harness_answer(row), "correct": float(value) >= 0.5})
    return out


def threads_now() -> int:
    return torch.get_num_threads()


__all__ = ["FPReference", "ReferenceCache", "build_fp_reference", "harness_items", "measure_rows", "mini_items",
           "ratio_param"]
