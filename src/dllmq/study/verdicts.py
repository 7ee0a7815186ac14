"""The paper's findings decided with confidence: each comparison holds or does not hold only when the 95 %
paired bootstrap interval of the difference it is about excludes the deciding value, and is
inconclusive otherwise. Each finding names the metric that decides it:

- comparisons of how much two settings (or two models) degrade - GPTQ vs AWQ, rotation vs smoothing,
  DuQuant vs QuaRot, 3-bit vs 4-bit, instruct vs base - are decided on the masked-prediction KL to
  FP at one mask ratio (KL@r, default 0.5): it measures the whole predicted distribution on the same
  masked windows for every setting, so its paired differences are sharp where a few hundred items
  only count a handful of flips. The accuracy drop's interval is quoted beside it.
- claims in accuracy points - W8A8 negligible (< 1), W4A4 severe (> 4), W4A16 not severe, math and code
  losing more points than general - are decided on the accuracy drop (FP - cell, per item, paired).
When a database has no KL (measures off) the comparisons fall back to the accuracy drop; when it has no
per-item answers at all (written before schema 2) the point-estimate rules of findings.py apply.

Pure functions over `evidence.ModelEvidence`; a finding's evidence sentence quotes the intervals.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from dllmq.study.evidence import DEFAULT_KL_RATIO, Estimate, ModelEvidence, mean_of
from dllmq.study.findings import (DOES_NOT_HOLD, HOLDS, INCONCLUSIVE, INSTRUCT, NOT_MEASURED, PER_MODEL, W3A16,
                                  W4A4, W4A16, W8A8, DropTable, Finding, Verdict, combine, instruct_pairs)
from dllmq.study.grid import AVG, MODERATE_AT, SEVERE_ABOVE, Setting, is_integer_label, method_name, parse_bits, \
    rotation_methods, weight_only_methods
from dllmq.study.stats import LEVEL

ACC = "accuracy drop"


def _kl_name(ratio: float) -> str:
    return f"KL@{ratio:g}"


def _pct() -> str:
    return f"{100 * LEVEL:g} % CI"


def _ci_text(e: Estimate, digits: int = 1, scale: float = 1.0, signed_drop: bool = False) -> str:
    """'-1.2 [-2.0, -0.4]' (a drop in the paper's sign: a loss is negative) or '0.012 [0.010, 0.015]'."""
    iv = e.ci()
    if signed_drop:  # + 0.0: no "-0.0"
        return f"{-iv.value + 0.0:+.{digits}f} [{-iv.hi + 0.0:+.{digits}f}, {-iv.lo + 0.0:+.{digits}f}]"
    return f"{iv.value * scale:.{digits}f} [{iv.lo * scale:.{digits}f}, {iv.hi * scale:.{digits}f}]"


def _kl_text(e: Estimate) -> str:
    iv = e.ci()
    return f"{iv.value:.4f} [{iv.lo:.4f}, {iv.hi:.4f}]"


class _Metric:
    """How one model's settings are compared: KL at a ratio when measured, else the accuracy drop."""

    def __init__(self, ev: ModelEvidence, ratio: float):
        self.ev, self.ratio = ev, ratio
        self.use_kl = ev.has_kl

    @property
    def name(self) -> str:
        if self.use_kl:
            ratios = {r for s in self.ev.settings.values() for r in s.kl}
            r = min(ratios, key=lambda x: (abs(x - self.ratio), x))
            return _kl_name(r)
        return ACC

    def of(self, key: tuple[str, str]) -> Estimate | None:
        se = self.ev.settings.get(key)
        if se is None:
            return None
        if self.use_kl:
            hit = se.kl_at(self.ratio)
            return None if hit is None else hit[1]
        return se.drop.get(AVG)

    def text(self, e: Estimate) -> str:
        return _kl_text(e) if self.use_kl else _ci_text(e, signed_drop=True)

    def diff_text(self, e: Estimate) -> str:
        return _kl_text(e) if self.use_kl else _ci_text(e)


def _at(ev: ModelEvidence, wa: tuple[int, int], methods: Sequence[str] | None = None) -> list[tuple[str, str]]:
    keys = [k for k in ev.settings if parse_bits(k[1]) == wa and is_integer_label(k[1])
            and (methods is None or k[0] in methods)]
    return sorted(keys, key=lambda k: Setting(*k).sort_key())


def _pick(ev: ModelEvidence, method: str, wa: tuple[int, int]) -> tuple[str, str] | None:
    keys = _at(ev, wa, [method])
    return keys[0] if keys else None


def _drop(ev: ModelEvidence, key: tuple[str, str], column: str = AVG) -> Estimate | None:
    se = ev.settings.get(key)
    return None if se is None else se.drop.get(column)


def _label(key: tuple[str, str]) -> str:
    return Setting(*key).label


def _v(subject: str, status: str, text: str, metric: str) -> Verdict:
    return Verdict(subject, status, text, metric)


# --- the checks -------------------------------------------------------------------------------------------

def sweet_spot_w4(ev: ModelEvidence, subject: str = "", ratio: float = DEFAULT_KL_RATIO) -> Verdict:
    """Holds when the best weight-only W4A16 drop is not severe (interval upper end <= 4) and the best W3A16
    setting degrades more than the best W4A16 one (the metric's difference interval above 0)."""
    met = _Metric(ev, ratio)
    w4 = [k for k in _at(ev, W4A16, weight_only_methods()) if met.of(k) is not None and _drop(ev, k) is not None]
    w3 = [k for k in _at(ev, W3A16, weight_only_methods()) if met.of(k) is not None]
    metric = f"{ACC} (W4A16 not severe) and {met.name} (3-bit worse), {_pct()}"
    if not w4 or not w3:
        missing = " or ".join(n for n, v in (("W4A16", w4), ("W3A16", w3)) if not v)
        return _v(subject, NOT_MEASURED, f"no weight-only {missing} measured.", metric)
    best_drop = min(w4, key=lambda k: _drop(ev, k).value)
    b4, b3 = min(w4, key=lambda k: met.of(k).value), min(w3, key=lambda k: met.of(k).value)
    d4 = _drop(ev, best_drop).ci()
    gap = met.of(b3) - met.of(b4)
    g = gap.ci()
    text = (f"best W4A16 accuracy change {_label(best_drop)} {_ci_text(_drop(ev, best_drop), signed_drop=True)}; "
            f"{met.name} best W3A16 {_label(b3)} {met.text(met.of(b3))} vs best W4A16 {_label(b4)} "
            f"{met.text(met.of(b4))}, difference {met.diff_text(gap)}")
    if d4.lo > SEVERE_ABOVE or g.hi < 0:
        why = "the best W4A16 is severe" if d4.lo > SEVERE_ABOVE else "3-bit degrades less than 4-bit"
        return _v(subject, DOES_NOT_HOLD, f"{text}: {why}.", metric)
    if d4.hi <= SEVERE_ABOVE and g.lo > 0:
        return _v(subject, HOLDS, f"{text}.", metric)
    why = [] if d4.hi <= SEVERE_ABOVE else ["W4A16 may be severe (interval reaches past 4)"]
    why += [] if g.lo > 0 else ["the 3-bit vs 4-bit difference interval contains 0"]
    return _v(subject, INCONCLUSIVE, f"{text}; {', and '.join(why)}.", metric)


def w8a8_near_lossless(ev: ModelEvidence, subject: str = "", ratio: float = DEFAULT_KL_RATIO) -> Verdict:
    """Holds when every W8A8 drop interval lies below 1 point; does not hold when one lies at or above 1."""
    metric = f"{ACC}, {_pct()}"
    keys = [k for k in _at(ev, W8A8) if _drop(ev, k) is not None]
    if not keys:
        return _v(subject, NOT_MEASURED, "no W8A8 accuracy measured item by item.", metric)
    cis = {k: _drop(ev, k).ci() for k in keys}
    text = "W8A8 accuracy change " + ", ".join(f"{method_name(k[0])} {_ci_text(_drop(ev, k), signed_drop=True)}"
                                               for k in keys)
    worse = [k for k, iv in cis.items() if iv.lo >= MODERATE_AT]
    if worse:
        return _v(subject, DOES_NOT_HOLD, f"{text}; at least 1 point lost: "
                  f"{', '.join(method_name(k[0]) for k in worse)}.", metric)
    if all(iv.hi < MODERATE_AT for iv in cis.values()):
        return _v(subject, HOLDS, f"{text}: every interval below a 1-point loss.", metric)
    unsure = [method_name(k[0]) for k, iv in cis.items() if iv.hi >= MODERATE_AT]
    return _v(subject, INCONCLUSIVE, f"{text}; the interval reaches a 1-point loss for {', '.join(unsure)}.", metric)


def w4a4_severe(ev: ModelEvidence, subject: str = "", ratio: float = DEFAULT_KL_RATIO) -> Verdict:
    """Holds when more than half of the W4A4 methods are severe with confidence (interval above 4); does
    not hold when so many are confidently not severe (interval at or below 4) that at most half can be."""
    metric = f"{ACC}, {_pct()}"
    keys = [k for k in _at(ev, W4A4) if _drop(ev, k) is not None]
    if not keys:
        return _v(subject, NOT_MEASURED, "no W4A4 accuracy measured item by item.", metric)
    cis = {k: _drop(ev, k).ci() for k in keys}
    severe = [k for k, iv in cis.items() if iv.lo > SEVERE_ABOVE]
    fine = [k for k, iv in cis.items() if iv.hi <= SEVERE_ABOVE]
    n = len(keys)
    text = ("W4A4 accuracy change " + ", ".join(f"{method_name(k[0])} {_ci_text(_drop(ev, k), signed_drop=True)}"
                                                for k in keys)
            + f": {len(severe)} of {n} severe and {len(fine)} not severe with confidence")
    if 2 * len(severe) > n:
        return _v(subject, HOLDS, text + ".", metric)
    if 2 * (n - len(fine)) <= n:
        return _v(subject, DOES_NOT_HOLD, text + " (at most half can be severe).", metric)
    return _v(subject, INCONCLUSIVE, text + ".", metric)


def _beats(ev: ModelEvidence, subject: str, better: tuple[str, str], worse: tuple[str, str], met: _Metric,
           what: str) -> Verdict:
    metric = f"{met.name}, {_pct()}"
    diff = met.of(worse) - met.of(better)
    iv = diff.ci()
    acc = ""
    if met.use_kl and _drop(ev, better) is not None and _drop(ev, worse) is not None:
        acc = (f" (accuracy change {_ci_text(_drop(ev, better), signed_drop=True)} vs "
               f"{_ci_text(_drop(ev, worse), signed_drop=True)})")
    text = (f"{met.name} {_label(better)} {met.text(met.of(better))} vs {_label(worse)} {met.text(met.of(worse))}, "
            f"difference {met.diff_text(diff)}{acc}")
    if iv.lo > 0:
        return _v(subject, HOLDS, f"{text}.", metric)
    if iv.hi < 0:
        return _v(subject, DOES_NOT_HOLD, f"{text}: {what} is the other way round.", metric)
    return _v(subject, INCONCLUSIVE, f"{text}: the interval contains 0.", metric)


def _pair_beats(ev: ModelEvidence, subject: str, ratio: float, better: tuple[str, str], worse: tuple[str, str],
                bits: tuple[int, int]) -> Verdict:
    """The finding: `better` degrades less than `worse` at `bits` (each a method and its display name)."""
    met = _Metric(ev, ratio)
    b, w = _pick(ev, better[0], bits), _pick(ev, worse[0], bits)
    if b is None or w is None or met.of(b) is None or met.of(w) is None:
        which = " and ".join(n for (_, n), v in ((better, b), (worse, w)) if v is None or met.of(v) is None)
        return _v(subject, NOT_MEASURED, f"no W{bits[0]}A{bits[1]} {met.name} for {which}.", f"{met.name}, {_pct()}")
    return _beats(ev, subject, b, w, met, "the gap")


def gptq_beats_awq(ev: ModelEvidence, subject: str = "", ratio: float = DEFAULT_KL_RATIO) -> Verdict:
    return _pair_beats(ev, subject, ratio, ("gptq", "GPTQ"), ("awq", "AWQ"), W4A16)


def rotation_beats_smoothing(ev: ModelEvidence, subject: str = "", ratio: float = DEFAULT_KL_RATIO) -> Verdict:
    met = _Metric(ev, ratio)
    sq = _pick(ev, "smoothquant", W4A4)
    rot = [k for k in _at(ev, W4A4, rotation_methods()) if met.of(k) is not None]
    if sq is None or met.of(sq) is None or not rot:
        need = "SmoothQuant" if sq is None or met.of(sq) is None else "QuaRot or DuQuant"
        return _v(subject, NOT_MEASURED, f"no W4A4 {met.name} for {need}.", f"{met.name}, {_pct()}")
    parts = [_beats(ev, subject, k, sq, met, "the gap") for k in rot]
    text = "; ".join(p.evidence.rstrip(".") for p in parts) + "."
    statuses = {p.status for p in parts}
    status = DOES_NOT_HOLD if DOES_NOT_HOLD in statuses else HOLDS if statuses == {HOLDS} else INCONCLUSIVE
    return _v(subject, status, text, parts[0].metric)


def duquant_beats_quarot(ev: ModelEvidence, subject: str = "", ratio: float = DEFAULT_KL_RATIO) -> Verdict:
    return _pair_beats(ev, subject, ratio, ("duquant", "DuQuant"), ("quarot", "QuaRot"), W4A4)


def math_code_degrade_more(ev: ModelEvidence, subject: str = "", ratio: float = DEFAULT_KL_RATIO) -> Verdict:
    """Over the quantized settings with every category measured, the mean math drop minus the mean general
    drop (and code likewise), paired: holds when both intervals lie above 0."""
    metric = f"{ACC} by category, {_pct()}"
    cats = [c for c in ("general", "math", "code") if any(c in s.drop for s in ev.settings.values())]
    if "general" not in cats or len(cats) < 2:
        return _v(subject, NOT_MEASURED, "needs general and at least one of math / code measured item by item.",
                  metric)
    keys = [k for k, s in ev.settings.items() if all(c in s.drop for c in cats)]
    if not keys:
        return _v(subject, NOT_MEASURED, "no quantized setting has every category measured item by item.", metric)
    mean = {c: mean_of([ev.settings[k].drop[c] for k in keys]) for c in cats}
    diffs = {c: mean[c] - mean["general"] for c in cats if c != "general"}
    text = (f"mean accuracy change over {len(keys)} quantized settings: "
            + ", ".join(f"{c} {_ci_text(mean[c], signed_drop=True)}" for c in cats)
            + "; extra loss vs general: " + ", ".join(f"{c} {_ci_text(d)}" for c, d in diffs.items()))
    ivs = {c: d.ci() for c, d in diffs.items()}
    if all(iv.lo > 0 for iv in ivs.values()):
        return _v(subject, HOLDS, text + ".", metric)
    if any(iv.hi < 0 for iv in ivs.values()):
        less = [c for c, iv in ivs.items() if iv.hi < 0]
        return _v(subject, DOES_NOT_HOLD, f"{text}: {' and '.join(less)} lose{'s' if len(less) == 1 else ''} "
                  "less than general.", metric)
    return _v(subject, INCONCLUSIVE, text + ": an interval contains 0.", metric)


def instruct_more_robust(base: ModelEvidence, instruct: ModelEvidence, subject: str = "",
                         ratio: float = DEFAULT_KL_RATIO) -> Verdict:
    """The base model's mean metric over the settings both have minus the instruct model's: holds when the
    interval lies above 0 (instruct degrades less)."""
    mb, mi = _Metric(base, ratio), _Metric(instruct, ratio)
    if mb.use_kl != mi.use_kl:
        mb.use_kl = mi.use_kl = False
    shared = sorted((k for k in base.settings if k in instruct.settings and mb.of(k) is not None
                     and mi.of(k) is not None), key=lambda k: Setting(*k).sort_key())
    metric = f"{mb.name}, {_pct()}"
    if not shared:
        return _v(subject, NOT_MEASURED, "no quantized setting measured for both models.", metric)
    b = mean_of([mb.of(k) for k in shared])
    i = mean_of([mi.of(k) for k in shared])
    diff = b - i
    iv = diff.ci()
    text = (f"mean {mb.name} over {len(shared)} shared settings: instruct {mb.text(i)} vs base {mb.text(b)}, "
            f"difference {mb.diff_text(diff)}")
    g3 = [k for k in shared if k[0] == "gptq" and parse_bits(k[1]) == W3A16]
    if g3 and _drop(base, g3[0]) is not None and _drop(instruct, g3[0]) is not None:
        text += (f"; 3-bit GPTQ accuracy change {_ci_text(_drop(instruct, g3[0]), signed_drop=True)} vs "
                 f"{_ci_text(_drop(base, g3[0]), signed_drop=True)}")
    if iv.lo > 0:
        return _v(subject, HOLDS, text + ".", metric)
    if iv.hi < 0:
        return _v(subject, DOES_NOT_HOLD, text + ": the instruct model degrades more.", metric)
    return _v(subject, INCONCLUSIVE, text + ": the interval contains 0.", metric)


CHECKS = {"w4_sweet_spot": sweet_spot_w4, "w8a8_lossless": w8a8_near_lossless, "w4a4_severe": w4a4_severe,
          "gptq_beats_awq": gptq_beats_awq, "rotation_beats_smoothing": rotation_beats_smoothing,
          "duquant_beats_quarot": duquant_beats_quarot, "math_code_worse": math_code_degrade_more}

RULES = {
    "w4_sweet_spot": "the best weight-only W4A16 accuracy drop is not severe (95 % CI upper end <= 4) and the best "
                     "W3A16 setting's KL to FP exceeds the best W4A16 one's (CI of the difference above 0).",
    "w8a8_lossless": "every W8A8 accuracy drop's 95 % CI lies below 1 point (does not hold: one lies at or above 1).",
    "w4a4_severe": "more than half of the W4A4 methods have a drop whose 95 % CI lies above 4 (does not hold: "
                   "enough lie at or below 4 that at most half can be severe).",
    "gptq_beats_awq": "AWQ's W4A16 KL to FP minus GPTQ's: 95 % CI above 0 (below 0: does not hold).",
    "rotation_beats_smoothing": "SmoothQuant's W4A4 KL to FP minus each rotation method's: every 95 % CI above 0.",
    "duquant_beats_quarot": "QuaRot's W4A4 KL to FP minus DuQuant's: 95 % CI above 0.",
    "math_code_worse": "over the quantized settings with every category, the mean math drop minus the mean general "
                       "drop, and code likewise (paired by item): both 95 % CIs above 0.",
    "instruct_robust": "the base model's mean KL to FP over the shared settings minus the instruct model's: 95 % CI "
                       "above 0.",
}


def evaluate_findings(table: DropTable, evidence: Mapping[str, ModelEvidence], ratio: float = DEFAULT_KL_RATIO,
                      ) -> list[Finding]:
    """Every finding; a model with per-item evidence is decided with intervals, one without by the point rules."""
    from dllmq.study.findings import evaluate_findings as point_findings

    legacy = {f.key: f for f in point_findings(table)}
    findings: list[Finding] = []
    for number, spec in enumerate(PER_MODEL, start=1):
        verdicts = []
        for model, drops in table.items():
            ev = evidence.get(model)
            if ev is not None and ev.has_items:
                verdicts.append(CHECKS[spec.key](ev, subject=model, ratio=ratio))
            else:
                verdicts.append(next(v for v in legacy[spec.key].verdicts if v.subject == model))
        status, summary = combine(verdicts) if verdicts else (NOT_MEASURED, f"{NOT_MEASURED}: no models.")
        findings.append(_finding(number, spec, status, summary, verdicts))
    pairs = instruct_pairs(list(table))
    verdicts = []
    for b, i in pairs:
        eb, ei = evidence.get(b), evidence.get(i)
        if eb is not None and ei is not None and eb.has_items and ei.has_items:
            verdicts.append(instruct_more_robust(eb, ei, subject=f"{i} vs {b}", ratio=ratio))
        else:
            verdicts.append(INSTRUCT.check(table[b], table[i], subject=f"{i} vs {b}"))
    if verdicts:
        status, summary = combine(verdicts)
    else:
        status, summary = NOT_MEASURED, f"{NOT_MEASURED}: no base/instruct model pair recognisable by name."
    findings.append(_finding(len(findings) + 1, INSTRUCT, status, summary, verdicts))
    return findings


def _finding(number: int, spec, status: str, summary: str, verdicts: list[Verdict]) -> Finding:
    metrics = sorted({v.metric for v in verdicts if v.metric})
    metric = "; ".join(metrics)
    rule = RULES[spec.key] if metrics else spec.rule
    if metrics and any(not v.metric for v in verdicts if v.status != NOT_MEASURED):
        rule += " Models without per-item data: " + spec.rule
    return Finding(number, spec.key, spec.title, spec.paper, rule, status, summary, verdicts, metric)


def decided(findings: Sequence[Finding]) -> int:
    """How many findings are decided with confidence (holds or does not hold, on intervals)."""
    return sum(f.status in (HOLDS, DOES_NOT_HOLD) and bool(f.metric) for f in findings)


__all__ = ["CHECKS", "RULES", "decided", "evaluate_findings"] + [name for name in (
    "sweet_spot_w4", "w8a8_near_lossless", "w4a4_severe", "gptq_beats_awq", "rotation_beats_smoothing",
    "duquant_beats_quarot", "math_code_degrade_more", "instruct_more_robust")]
