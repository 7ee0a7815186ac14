"""dLLM-aware calibration against clean-text calibration (issue 19's ablation table).

A study cell whose settings use a dLLM-aware option (`mask_schedule`, `weighting`, or chat-shaped
calibration windows) is paired with its baseline: the cell of the same model, bit config and seed whose
settings are the same once those options are removed. Each pair is compared on the evidence the report
already has against FP (evidence.py), so every difference is paired on the same windows and items and
carries a bootstrap interval:

- KL vs FP at each measured mask ratio, as a relative change (variant / baseline - 1);
- the ELBO perplexity change vs FP, variant minus baseline;
- the average accuracy drop vs FP and the right->wrong flips, variant minus baseline.

The issue's goal ("dLLM-aware calibration lowers KL vs FP by at least 20 %") gets a verdict per pair at
the report's KL ratio: reached when the whole interval lies at or below -20 %, not reached when the whole
interval lies above it, undecided otherwise.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dllmq.study.evidence import Estimate, ModelEvidence
from dllmq.study.grid import AVG, Setting

# The settings that make a calibration dLLM-aware, and the value each has when it is off.
DLLM_AWARE_OFF = {"mask_schedule": "none", "weighting": "none", "calib_windows": None}
GOAL = -0.20          # the target: KL vs FP at least 20 % lower than clean-text calibration
REACHED, NOT_REACHED, UNDECIDED = "reached", "not reached", "undecided"


@dataclass
class AblationRow:
    model: str
    variant: Setting
    baseline: Setting
    options: dict[str, str]                                    # the dLLM-aware settings of the variant
    kl_change: dict[float, Estimate] = field(default_factory=dict)   # ratio -> variant / baseline - 1
    ppl_delta: Estimate | None = None      # (variant ELBO ppl - FP) - (baseline ELBO ppl - FP)
    drop: Estimate | None = None           # variant's accuracy drop vs FP - baseline's (points; + = worse)
    right_to_wrong: Estimate | None = None # variant's R>W flip fraction - baseline's

    def goal(self, ratio: float) -> str | None:
        """The issue's 20 % verdict at the measured ratio nearest `ratio` (None: no KL measured)."""
        if not self.kl_change:
            return None
        est = self.kl_change[min(self.kl_change, key=lambda r: (abs(r - ratio), r))]
        ci = est.ci()
        if ci.hi <= GOAL:
            return REACHED
        if ci.lo > GOAL:
            return NOT_REACHED
        return UNDECIDED


def dllm_options(settings: Mapping) -> dict[str, str]:
    """The dLLM-aware settings in a cell's settings JSON (those not at their off value)."""
    out = {}
    for key, off in DLLM_AWARE_OFF.items():
        value = settings.get(key)
        if value is None or value == off or (key == "calib_windows" and value != "chat"):
            continue
        out[key] = str(value)
    return out


def _without_options(settings: Mapping) -> str:
    rest = {k: v for k, v in settings.items() if k not in DLLM_AWARE_OFF or
            (k == "calib_windows" and v != "chat")}
    return json.dumps(rest, sort_keys=True)


def _relative(a: Estimate, b: Estimate) -> Estimate | None:
    """a / b - 1 with its replicates (None when a baseline replicate is not positive: KL is, unless zero)."""
    if b.value <= 0 or (b.reps <= 0).any():
        return None
    return Estimate(a.value / b.value - 1.0, a.reps / b.reps - 1.0)


def _diff(a: Estimate | None, b: Estimate | None) -> Estimate | None:
    return None if a is None or b is None else a - b


def ablation_rows(cells: Sequence[Mapping], evidence: Mapping[str, ModelEvidence]) -> list[AblationRow]:
    """One row per dLLM-aware cell that has a clean-text baseline in `cells` (rows of the cells table)
    and evidence against FP for both; in the order of `cells` (model, then label)."""
    by_key: dict[tuple[str, str, str], dict] = {}      # (model, bits, settings without options) -> method
    variants = []
    for c in sorted(cells, key=lambda c: (str(c["model"]), str(c["method"]), str(c["bits"]))):
        if c.get("status", "done") != "done":
            continue
        try:
            settings = json.loads(c.get("settings") or "{}")
        except ValueError:
            continue
        if not settings:
            continue
        options = dllm_options(settings)
        key = (str(c["model"]), str(c["bits"]), _without_options(settings))
        if options:
            variants.append((key, c, options))
        else:
            by_key.setdefault(key, c)
    rows = []
    for key, c, options in variants:
        base = by_key.get(key)
        ev = evidence.get(key[0])
        if base is None or ev is None:
            continue
        v = ev.settings.get((str(c["method"]).lower(), str(c["bits"])))
        b = ev.settings.get((str(base["method"]).lower(), str(base["bits"])))
        if v is None or b is None:
            continue
        row = AblationRow(key[0], v.setting, b.setting, options)
        for ratio in sorted(set(v.kl) & set(b.kl)):
            change = _relative(v.kl[ratio], b.kl[ratio])
            if change is not None:
                row.kl_change[ratio] = change
        row.ppl_delta = _diff(v.ppl_delta, b.ppl_delta)
        row.drop = _diff(v.drop.get(AVG), b.drop.get(AVG))
        row.right_to_wrong = _diff(v.flips.get("all", {}).get("right_to_wrong"),
                                   b.flips.get("all", {}).get("right_to_wrong"))
        rows.append(row)
    return rows


__all__ = ["AblationRow", "DLLM_AWARE_OFF", "GOAL", "NOT_REACHED", "REACHED", "UNDECIDED", "ablation_rows",
           "dllm_options"]
