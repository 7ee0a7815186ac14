"""The paper's findings ("Quantization Meets dLLMs", arXiv 2508.14896) as a checklist, each checked
against this run's numbers.

Every check is a small pure function over a *drop table*: for one model,
`{(method, bits): {"general": drop, "math": drop, "code": drop, "avg": drop}}` with drops in points
(FP - quantized, positive = worse) and unmeasured entries simply absent. `grid.ModelTable.drops()`
builds it from the study database; tests write it by hand. A check returns a Verdict: holds, does not
hold, or not measured (the cells it needs are missing), with an evidence sentence quoting the numbers
in the paper's sign convention (a loss of 2.1 points reads -2.1). Findings that do not hold are
reported as such, never dropped.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from dllmq.study.grid import (AVG, MODERATE_AT, NEGLIGIBLE, SEVERE, Setting, classify, is_integer_label, method_name,
                              parse_bits, rotation_methods, weight_only_methods)

HOLDS, DOES_NOT_HOLD, MIXED, NOT_MEASURED = "holds", "does not hold", "mixed", "not measured"
# Decided with confidence intervals (verdicts.py) but the interval contains the deciding value.
INCONCLUSIVE = "inconclusive"

Drops = Mapping[str, float]                              # category / "avg" -> drop in points
ModelDrops = Mapping[tuple[str, str], Drops]             # (method, bits) -> drops
DropTable = Mapping[str, ModelDrops]                     # model -> its drops

W4A16, W3A16, W8A8, W4A4 = (4, 16), (3, 16), (8, 8), (4, 4)
# "A beats B" needs A's drop smaller by at least the negligible class edge: a smaller gap is a tie, since
# one item of a 100-item task is already one point.
MARGIN = MODERATE_AT
TIE = f"a gap under {MARGIN:g} point is a tie"


def beats(a: float, b: float) -> bool:
    """Whether a drop of `a` points is clearly smaller than a drop of `b` (by MARGIN or more)."""
    return round(b - a, 9) >= MARGIN


def _tie_note(drops: Sequence[float], other: float) -> str:
    """'; a gap under 1 point is a tie' when some drop is within MARGIN of `other` (else nothing)."""
    return f"; {TIE}" if any(abs(d - other) < MARGIN for d in drops) else ""


@dataclass(frozen=True)
class Verdict:
    """A finding checked on one subject (a model, or a base/instruct pair)."""

    subject: str
    status: str      # holds | does not hold | inconclusive | not measured
    evidence: str
    metric: str = ""  # what decided it (e.g. "KL@0.5, 95 % CI"); "" for the point-estimate rules


@dataclass
class Finding:
    number: int
    key: str
    title: str
    paper: str       # what the paper reports
    rule: str        # how this report decides it
    status: str      # holds | does not hold | mixed | inconclusive | not measured
    summary: str
    verdicts: list[Verdict] = field(default_factory=list)
    metric: str = ""  # the metric that decided it ("" : point estimates, no confidence)

    def line(self) -> str:
        """One line for a terminal: 'GPTQ beats AWQ at W4A16: holds: GPTQ -0.4 vs AWQ -2.1 ...'."""
        return f"{self.title}: {self.summary}"


# --- formatting ---------------------------------------------------------------------------------------

def signed(drop: float) -> str:
    """A drop in the paper's sign convention: a loss of 2.14 points -> '-2.1', a gain -> '+0.3'. Near a
    class edge more decimals are shown, so the text never contradicts the class (0.96 is '-0.96', not a
    negligible '-1.0')."""
    for digits in (1, 2, 3):
        if classify(round(drop, digits)) == classify(drop):
            break
    delta = round(-drop, digits)
    return f"{0.0:.{digits}f}" if delta == 0 else f"{delta:+.{digits}f}"


def _name(setting: tuple[str, str]) -> str:
    return Setting(*setting).label


# --- looking cells up ---------------------------------------------------------------------------------

def pick(drops: ModelDrops, method: str, wa: tuple[int, int], column: str = AVG) -> tuple[str, float] | None:
    """(bits label, drop) of `method` at (weight bits, activation bits) in `column`; when several labels
    mean the same bits (W4A16 and W4A16-g128) the first in sorted order is used."""
    labels = sorted(bits for (m, bits), d in drops.items()
                    if m == method and parse_bits(bits) == wa and is_integer_label(bits) and column in d)
    if not labels:
        return None
    return labels[0], drops[(method, labels[0])][column]


def at_bits(drops: ModelDrops, wa: tuple[int, int], methods: Sequence[str] | None = None,
            column: str = AVG) -> dict[str, float]:
    """method -> drop of every method measured at these bits (restricted to `methods` when given), in
    the paper's method order."""
    found = {m for (m, bits) in drops if parse_bits(bits) == wa and is_integer_label(bits) and not Setting(m, bits).is_fp}
    if methods is not None:
        found &= set(methods)
    out: dict[str, float] = {}
    for m in sorted(found, key=lambda m: Setting(m, "W4A16").sort_key()):
        hit = pick(drops, m, wa, column)
        if hit is not None:
            out[m] = hit[1]
    return out


def _bits_name(wa: tuple[int, int]) -> str:
    return f"W{wa[0]}A{wa[1]}"


def _plural(k: int, noun: str) -> str:
    return f"{k} {noun}" + ("" if k == 1 else "s")


def _list(values: Mapping[str, float]) -> str:
    return ", ".join(f"{method_name(m)} {signed(d)}" for m, d in values.items())


# --- the checks (one model each, except instruct vs base) --------------------------------------------

def sweet_spot_w4(drops: ModelDrops, subject: str = "") -> Verdict:
    """1. 4-bit is the weight-only sweet spot: the best W4A16 weight-only method is not severe (drop
    <= 4) and the best W3A16 one loses more than 1 point more than it."""
    w4 = at_bits(drops, W4A16, weight_only_methods())
    w3 = at_bits(drops, W3A16, weight_only_methods())
    missing = [_bits_name(wa) for wa, v in ((W4A16, w4), (W3A16, w3)) if not v]
    if missing:
        return Verdict(subject, NOT_MEASURED, f"no weight-only {' or '.join(missing)} average measured.")
    m4, m3 = min(w4, key=w4.get), min(w3, key=w3.get)
    d4, d3 = w4[m4], w3[m3]
    small, gap = classify(d4) != SEVERE, d3 - d4
    text = (f"best W4A16 {method_name(m4)} {signed(d4)} ({classify(d4)}), best W3A16 {method_name(m3)} "
            f"{signed(d3)} ({classify(d3)}): 3-bit costs {abs(gap):.1f} points {'more' if gap >= 0 else 'less'}")
    if small and gap > 1.0:
        return Verdict(subject, HOLDS, text + ".")
    why = [] if small else ["the best W4A16 is already severe"]
    why += [] if gap > 1.0 else ["3-bit is not clearly worse (<= 1 point more)"]
    return Verdict(subject, DOES_NOT_HOLD, f"{text}; {', and '.join(why)}.")


def w8a8_near_lossless(drops: ModelDrops, subject: str = "") -> Verdict:
    """2. W8A8 is near-lossless: every W8A8 method's average drop is negligible (< 1 point)."""
    w8 = at_bits(drops, W8A8)
    if not w8:
        return Verdict(subject, NOT_MEASURED, "no W8A8 average measured.")
    worse = [m for m, d in w8.items() if classify(d) != NEGLIGIBLE]
    text = f"W8A8 average {_list(w8)}"
    if not worse:
        return Verdict(subject, HOLDS, text + ": all within 1 point.")
    return Verdict(subject, DOES_NOT_HOLD,
                   f"{text}; not negligible: {', '.join(method_name(m) for m in worse)}.")


def w4a4_severe(drops: ModelDrops, subject: str = "") -> Verdict:
    """3. W4A4 is severe: more than half of the W4A4 methods measured lose more than 4 points on average."""
    w4 = at_bits(drops, W4A4)
    if not w4:
        return Verdict(subject, NOT_MEASURED, "no W4A4 average measured.")
    severe = [m for m, d in w4.items() if classify(d) == SEVERE]
    text = f"W4A4 average {_list(w4)}: {len(severe)} of {len(w4)} severe"
    if 2 * len(severe) > len(w4):
        return Verdict(subject, HOLDS, text + ".")
    return Verdict(subject, DOES_NOT_HOLD, text + " (needs more than half).")


def gptq_beats_awq(drops: ModelDrops, subject: str = "") -> Verdict:
    """4. GPTQ beats AWQ at W4A16: an average drop smaller by MARGIN or more (W3A16 and the general
    category reported too)."""
    g4, a4 = pick(drops, "gptq", W4A16), pick(drops, "awq", W4A16)
    extra = []
    g3, a3 = pick(drops, "gptq", W3A16), pick(drops, "awq", W3A16)
    if g3 and a3:
        extra.append(f"W3A16 {signed(g3[1])} vs {signed(a3[1])}")
    gg, ag = pick(drops, "gptq", W4A16, "general"), pick(drops, "awq", W4A16, "general")
    if gg and ag:
        extra.append(f"W4A16 general {signed(gg[1])} vs {signed(ag[1])}")
    tail = f" ({'; '.join(extra)})" if extra else ""
    if not (g4 and a4):
        which = " and ".join(n for n, v in (("GPTQ", g4), ("AWQ", a4)) if not v)
        return Verdict(subject, NOT_MEASURED, f"no W4A16 average for {which}{tail}.")
    text = f"GPTQ {signed(g4[1])} vs AWQ {signed(a4[1])} W4A16 average{tail}"
    if beats(g4[1], a4[1]):
        return Verdict(subject, HOLDS, f"{text}.")
    return Verdict(subject, DOES_NOT_HOLD, f"{text}{_tie_note([g4[1]], a4[1])}.")


def rotation_beats_smoothing(drops: ModelDrops, subject: str = "") -> Verdict:
    """5. Rotation beats smoothing at W4A4: every rotation method measured (QuaRot, DuQuant) drops less
    than SmoothQuant on average, by MARGIN or more."""
    w4 = at_bits(drops, W4A4)
    rot = {m: d for m, d in w4.items() if m in rotation_methods()}
    if "smoothquant" not in w4 or not rot:
        need = "SmoothQuant" if "smoothquant" not in w4 else "QuaRot or DuQuant"
        return Verdict(subject, NOT_MEASURED, f"no W4A4 average for {need}.")
    sq = w4["smoothquant"]
    text = f"W4A4 average {_list(rot)} vs SmoothQuant {signed(sq)}"
    losers = [m for m, d in rot.items() if not beats(d, sq)]
    if not losers:
        return Verdict(subject, HOLDS, f"{text}.")
    return Verdict(subject, DOES_NOT_HOLD,
                   f"{text}; not better: {', '.join(method_name(m) for m in losers)}"
                   f"{_tie_note([rot[m] for m in losers], sq)}.")


def duquant_beats_quarot(drops: ModelDrops, subject: str = "") -> Verdict:
    """5b. DuQuant beats QuaRot at W4A4: an average drop smaller by MARGIN or more."""
    d, q = pick(drops, "duquant", W4A4), pick(drops, "quarot", W4A4)
    if not (d and q):
        which = " and ".join(n for n, v in (("DuQuant", d), ("QuaRot", q)) if not v)
        return Verdict(subject, NOT_MEASURED, f"no W4A4 average for {which}.")
    text = f"DuQuant {signed(d[1])} vs QuaRot {signed(q[1])} W4A4 average"
    if beats(d[1], q[1]):
        return Verdict(subject, HOLDS, f"{text}.")
    return Verdict(subject, DOES_NOT_HOLD, f"{text}{_tie_note([d[1]], q[1])}.")


def math_code_degrade_more(drops: ModelDrops, subject: str = "") -> Verdict:
    """6. Math and code degrade more than general: over the quantized settings that have every measured
    category, the mean math drop and the mean code drop both exceed the mean general drop by MARGIN."""
    present = [c for c in ("general", "math", "code") if any(c in d for d in drops.values())]
    if "general" not in present or len(present) < 2:
        return Verdict(subject, NOT_MEASURED, "needs general and at least one of math / code measured.")
    rows = [d for d in drops.values() if all(c in d for c in present)]
    if not rows:
        return Verdict(subject, NOT_MEASURED, f"no quantized setting has all of {', '.join(present)} measured.")
    mean = {c: sum(d[c] for d in rows) / len(rows) for c in present}
    text = (f"mean over {_plural(len(rows), 'quantized setting')}: "
            + ", ".join(f"{c} {signed(mean[c])}" for c in present))
    missing = [c for c in ("math", "code") if c not in present]
    if missing:
        text += f" ({' and '.join(missing)} not measured)"
    worse = [c for c in present if c != "general" and not beats(mean["general"], mean[c])]
    if not worse:
        return Verdict(subject, HOLDS, text + ".")
    note = _tie_note([mean[c] for c in worse], mean["general"])
    return Verdict(subject, DOES_NOT_HOLD, f"{text}; not worse than general: {', '.join(worse)}{note}.")


_TOKENS = re.compile(r"[-_ .]+")


def model_stem(model: str) -> tuple[str, bool]:
    """(name without base/instruct, is instruct) of a model name or path: LLaDA-8B-Instruct ->
    ('llada-8b', True); Dream-v0-Base-7B -> ('dream-v0-7b', False); dllmq-tiny -> ('dllmq-tiny', False)."""
    name = re.split(r"[\\/]", model.rstrip("/\\"))[-1].lower()
    tokens = [t for t in _TOKENS.split(name) if t]
    stem = "-".join(t for t in tokens if t not in ("base", "instruct"))
    return stem, "instruct" in tokens


def instruct_pairs(models: Sequence[str]) -> list[tuple[str, str]]:
    """(base, instruct) pairs recognisable by name: X / X-instruct, X-Base / X-Instruct."""
    pairs = []
    for inst in sorted(models):
        stem, is_inst = model_stem(inst)
        if not is_inst:
            continue
        bases = sorted(m for m in models if m != inst and model_stem(m) == (stem, False))
        if bases:
            pairs.append((bases[0], inst))
    return pairs


def instruct_more_robust(base: ModelDrops, instruct: ModelDrops, subject: str = "") -> Verdict:
    """7. Instruct is more robust than Base: over the quantized settings both have an average for, the
    instruct model's mean average drop is smaller by MARGIN or more."""
    shared = sorted((k for k in base if AVG in base[k] and k in instruct and AVG in instruct[k]),
                    key=lambda k: Setting(*k).sort_key())
    if not shared:
        return Verdict(subject, NOT_MEASURED, "no quantized setting with an average for both models.")
    b = sum(base[k][AVG] for k in shared) / len(shared)
    i = sum(instruct[k][AVG] for k in shared) / len(shared)
    text = f"instruct {signed(i)} vs base {signed(b)} mean average drop over {_plural(len(shared), 'shared setting')}"
    g3 = [k for k in shared if k[0] == "gptq" and parse_bits(k[1]) == W3A16]
    if g3:
        text += f"; 3-bit GPTQ {signed(instruct[g3[0]][AVG])} vs {signed(base[g3[0]][AVG])}"
    if beats(i, b):
        return Verdict(subject, HOLDS, f"{text}.")
    return Verdict(subject, DOES_NOT_HOLD, f"{text}{_tie_note([i], b)}.")


# --- the checklist -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Spec:
    key: str
    title: str
    paper: str
    rule: str
    check: Callable[..., Verdict]


PER_MODEL = (
    _Spec("w4_sweet_spot", "4-bit is the weight-only sweet spot",
          "W4A16 loses little (LLaDA-8B-Instruct general with GPTQ: 65.7 -> 66.0); W3A16 drops severely, over "
          "10 points on math and code.",
          "the best weight-only W4A16 average drop is not severe (<= 4) and the best W3A16 one is more than "
          "1 point larger.", sweet_spot_w4),
    _Spec("w8a8_lossless", "W8A8 is near-lossless",
          "W8A8 is near-lossless with SmoothQuant, QuaRot and DuQuant.",
          "every W8A8 method's average drop is negligible (< 1).", w8a8_near_lossless),
    _Spec("w4a4_severe", "W4A4 is severe",
          "W4A4 degrades severely even with the best methods (DuQuant -5.1, QuaRot -6.6, SmoothQuant up to "
          "-37.3 on math/code).",
          "more than half of the W4A4 methods measured have a severe average drop (> 4).", w4a4_severe),
    _Spec("gptq_beats_awq", "GPTQ beats AWQ at W4A16",
          "LLaDA general W4A16: GPTQ -0.3 vs AWQ -3.5 points.",
          "GPTQ's W4A16 average drop is at least 1 point smaller than AWQ's (W3A16 and general shown too).",
          gptq_beats_awq),
    _Spec("rotation_beats_smoothing", "Rotation beats smoothing at W4A4",
          "QuaRot and DuQuant keep W4A4 usable; SmoothQuant loses up to 37.3 points on math/code.",
          "every rotation method measured (QuaRot, DuQuant) has a W4A4 average drop at least 1 point smaller "
          "than SmoothQuant's.",
          rotation_beats_smoothing),
    _Spec("duquant_beats_quarot", "DuQuant beats QuaRot at W4A4",
          "DuQuant -5.1 vs QuaRot -6.6 points.",
          "DuQuant's W4A4 average drop is at least 1 point smaller than QuaRot's.", duquant_beats_quarot),
    _Spec("math_code_worse", "Math and code degrade more than general",
          "math and code tasks lose more than general QA under the same quantization.",
          "over the quantized settings with every category measured, the mean math drop and the mean code drop "
          "both exceed the mean general drop by at least 1 point.", math_code_degrade_more),
)
INSTRUCT = _Spec("instruct_robust", "Instruct is more robust than Base",
                 "LLaDA 3-bit GPTQ: Instruct about -5 vs Base about -10 points.",
                 "for each base/instruct pair recognised by name (X and X-Instruct, X-Base and X-Instruct), the "
                 "instruct model's mean average drop over the settings both have is at least 1 point smaller.",
                 instruct_more_robust)


def combine(verdicts: Sequence[Verdict]) -> tuple[str, str]:
    """The overall status and a summary starting with it, from per-subject verdicts: holds / does not hold
    when every measured subject agrees, mixed when they do not, not measured when none is."""
    measured = [v for v in verdicts if v.status != NOT_MEASURED]
    unmeasured = [v.subject for v in verdicts if v.status == NOT_MEASURED]
    if not measured:
        if len(verdicts) == 1:
            return NOT_MEASURED, f"{NOT_MEASURED}: {verdicts[0].evidence}"
        return NOT_MEASURED, f"{NOT_MEASURED} for any of the {len(verdicts)} models."
    tail = f" Not measured for {', '.join(unmeasured)}." if unmeasured else ""
    if len(measured) == 1:
        v = measured[0]
        who = f" for {v.subject}" if v.subject and len(verdicts) > 1 else ""
        return v.status, f"{v.status}{who}: {v.evidence}{tail}"
    holds = [v.subject for v in measured if v.status == HOLDS]
    unsure = [v.subject for v in measured if v.status == INCONCLUSIVE]
    if len(holds) == len(measured):
        return HOLDS, f"{HOLDS} for {', '.join(holds)}.{tail}"
    fails = [v.subject for v in measured if v.status == DOES_NOT_HOLD]
    if holds and fails:
        extra = f"; inconclusive for {', '.join(unsure)}" if unsure else ""
        return MIXED, f"{MIXED}: holds for {', '.join(holds)}; does not hold for {', '.join(fails)}{extra}.{tail}"
    if unsure:  # a finding is decided only when every measured subject is
        decided = [f"{v.status} for {v.subject}" for v in measured if v.status != INCONCLUSIVE]
        return INCONCLUSIVE, (f"{INCONCLUSIVE} for {', '.join(unsure)}" + (f"; {'; '.join(decided)}" if decided else "")
                              + f".{tail}")
    return DOES_NOT_HOLD, f"{DOES_NOT_HOLD} for {', '.join(fails)}.{tail}"


def evaluate_findings(table: DropTable) -> list[Finding]:
    """Every finding, checked per model (per base/instruct pair for the last), with an overall verdict."""
    findings: list[Finding] = []
    for number, spec in enumerate(PER_MODEL, start=1):
        verdicts = [spec.check(drops, subject=model) if any(drops.values()) else
                    Verdict(model, NOT_MEASURED, "no drop vs FP for this model (no FP baseline, or no quantized "
                                                 "result on the baseline's tasks).")
                    for model, drops in table.items()]
        status, summary = combine(verdicts) if verdicts else (NOT_MEASURED, f"{NOT_MEASURED}: no models.")
        findings.append(Finding(number, spec.key, spec.title, spec.paper, spec.rule, status, summary, verdicts))
    pairs = instruct_pairs(list(table))
    verdicts = [INSTRUCT.check(table[b], table[i], subject=f"{i} vs {b}") for b, i in pairs]
    if verdicts:
        status, summary = combine(verdicts)
    else:
        status, summary = NOT_MEASURED, f"{NOT_MEASURED}: no base/instruct model pair recognisable by name."
    findings.append(Finding(len(findings) + 1, INSTRUCT.key, INSTRUCT.title, INSTRUCT.paper, INSTRUCT.rule,
                            status, summary, verdicts))
    return findings
