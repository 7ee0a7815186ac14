"""The per-cell measures against the model's own full precision, as the study runner stores them.

- `FPReference`: what the FP model says on the measure windows (dllmq.diffusion.divergence) and, for
  the trajectory measure, FP's denoising trajectories on the first items of each mini generation task.
  A causal model (the AR twin) has no mask token: its reference is the next-token distributions on the
  same windows (dllmq.diffusion.next_token, stored as kl_next / top1_next and the exact NLL as
  nll / nll_fp) and FP's greedy continuations of the same prompts, teacher-forced (traj_flip, as for
  the diffusion models: the fraction of generated positions where the cell picks another token).
  Built once per (model, seed, dtype, device, settings) and kept by `ReferenceCache` for the run; every
  quantized cell of the model compares itself with it, so FP runs once, not once per cell.
- `measure_rows`: the `measures` rows of one cell (per-window KL and top-1 agreement by mask ratio, the
  ELBO NLL of the cell and of FP; the trajectory flip rate by step), each with its per-unit values.
- `outlier_rows`: the FP cell's activation-outlier profile (dllmq.analysis.outliers) on the first
  `outliers` measure windows: the share of tokens carrying a massive value by mask ratio (massive_frac)
  and by position on clean text (massive_pos), per window - what the report's family comparison shows.
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
from dllmq.diffusion.next_token import (Continuation, NextTokenReference, build_next_token_reference,
                                        compare_next_token, continuation_flips, record_continuation)
from dllmq.diffusion.text import encode_prompts, format_prompt
from dllmq.diffusion.trajectory import Trajectory, record_trajectory, teacher_forced_flips
from dllmq.evaluate.mini import GEN_SETTINGS, generation_prompts, is_chat_model, load_items
from dllmq.study.config import MeasureSettings

log = logging.getLogger(__name__)

TRAJECTORY_TASKS = ("mini_math", "mini_code")


@dataclass
class FPReference:
    divergence: Reference | NextTokenReference    # the masked windows (diffusion) or next tokens (causal)
    setup: str                                    # identity of the windows and masks
    trajectories: dict[str, Trajectory | Continuation] = field(default_factory=dict)
    seconds: float = 0.0                          # what building it cost

    @property
    def causal(self) -> bool:
        return isinstance(self.divergence, NextTokenReference)


def _setup_hash(ref: Reference | NextTokenReference, settings: MeasureSettings, seed: int) -> str:
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
    causal = model.family.causal
    if causal:
        ref = build_next_token_reference(model, windows, batch_size=settings.batch_size)
    else:
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
                mask = None if mask.all() else mask
                if causal:   # the causal sampler's budget is the task's gen_length, as in the mini tasks
                    trajectories[task] = record_continuation(model, ids, mask,
                                                             gen_length=GEN_SETTINGS[task, chat]["gen_length"])
                else:
                    trajectories[task] = record_trajectory(model, ids, mask, seed=seed, **GEN_SETTINGS[task, chat])
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
    rows = []
    if ref.causal:
        nd = compare_next_token(model, ref.divergence)
        seconds = time.perf_counter() - start
        rows += [_row("kl_next", "", nd.kl, ref.setup, seconds), _row("top1_next", "", nd.top1, ref.setup, seconds),
                 _row("nll", "", nd.nll, ref.setup, seconds), _row("nll_fp", "", nd.nll_ref, ref.setup, seconds)]
        return rows + _trajectory_rows(model, ref)
    div = compare(model, ref.divergence)
    seconds = time.perf_counter() - start
    for r in ref.divergence.ratios:
        rows.append(_row("kl", ratio_param(r), div.kl[r], ref.setup, seconds))
        rows.append(_row("top1", ratio_param(r), div.top1[r], ref.setup, seconds))
    if ref.divergence.elbo_masks.shape[1]:
        rows.append(_row("elbo_nll", "", div.nll, ref.setup, seconds))
        rows.append(_row("elbo_nll_fp", "", div.nll_ref, ref.setup, seconds))
    return rows + _trajectory_rows(model, ref)


def _trajectory_rows(model, ref: FPReference) -> list[dict]:
    rows = []
    for task, traj in ref.trajectories.items():
        start = time.perf_counter()
        if isinstance(traj, Continuation):
            flips = continuation_flips(model, traj)     # [items][generated tokens] 0/1
        else:
            flips = teacher_forced_flips(model, traj)   # [items][steps] 0/1
        seconds = time.perf_counter() - start
        steps = max((len(f) for f in flips), default=0)
        per_item = [sum(f) / len(f) for f in flips if f]
        rows.append(_row("traj_flip", task, per_item, ref.setup, seconds))
        for s in range(steps):
            rows.append(_row("traj_flip_step", f"{task}:{s + 1}", [f[s] for f in flips if len(f) > s], ref.setup,
                             seconds))
    return rows


# ----------------------------------------------------------------------------- activation outliers
def position_buckets(length: int) -> list[tuple[int, int]]:
    """Token positions grouped by powers of two, first and last included: (0, 0), (1, 1), (2, 3), (4, 7), ...
    - an attention sink at position 0 stands alone, later positions are pooled."""
    out, start = [(0, 0)], 1
    while start < length:
        out.append((start, min(2 * start - 1, length - 1)))
        start *= 2
    return out


def bucket_param(bucket: tuple[int, int]) -> str:
    a, b = bucket
    return str(a) if a == b else f"{a}-{b}"


def outlier_rows(model, windows: torch.Tensor, settings: MeasureSettings, seed: int, setup: str) -> list[dict]:
    """The model's massive-activation profile on the first `settings.outliers` measure `windows` (`setup`: their
    identity, FPReference.setup): per window,
    the share of tokens carrying a massive value in any block linear's input (dllmq.analysis.outliers'
    definition) at every mask ratio (0 = clean text, then the measure ratios; causal models: 0 only), and on
    clean text per position bucket. [] when the setting is 0."""
    from dllmq.analysis.outliers import profile_outliers

    n = min(settings.outliers, windows.shape[0])
    if n < 1:
        return []
    start = time.perf_counter()
    report = profile_outliers(model, None, input_ids=windows[:n], mask_ratios=(0.0, *settings.ratios), seed=seed,
                              batch_size=settings.batch_size, surface_layers=0)
    seconds = time.perf_counter() - start
    setup = f"{setup}:outliers:{n}"
    rows = []
    for p in report.profiles:
        massive = p.massive_tokens().float()            # [windows, T]
        rows.append(_row("massive_frac", ratio_param(p.mask_ratio), massive.mean(1).tolist(), setup, seconds))
        if p.mask_ratio == 0.0:
            for b in position_buckets(massive.shape[1]):
                rows.append(_row("massive_pos", bucket_param(b), massive[:, b[0]:b[1] + 1].mean(1).tolist(), setup,
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
           "outlier_rows", "position_buckets", "ratio_param"]
