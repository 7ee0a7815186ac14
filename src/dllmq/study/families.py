"""The report's family comparison: autoregressive vs LLaDA-style vs Dream-style models of one grid.

Shown when the study's models span at least two model families (the shipped `families` grid: the AR
twin dllmq-tiny-ar, dllmq-tiny and dllmq-tiny-dream). Two tables, from what every study stores:

- degradation per family: each quantized setting's overall accuracy change vs FP and its distance to
  FP's distributions (masked-prediction KL at the report's ratio for a diffusion model, next-token KL
  for a causal one: the two are each family's own prediction task, not the same quantity), side by
  side, and the mean over the settings every model has;
- massive activations of FP (measures.outliers): the share of tokens carrying a massive value in any
  block linear's input, by mask ratio (a causal model has no mask token: ratio 0 only) and, on clean
  text, by position (position 0 alone, then doubling buckets: where an attention sink would show).

Models a grid names but this installation does not ship are listed with the reason (`unavailable`).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from dllmq.study.evidence import Estimate, ModelEvidence, format_ci, mean_of
from dllmq.study.grid import ModelTable, Setting

FAMILY_LABEL = {"llama": "autoregressive", "llada": "LLaDA-style", "dream": "Dream-style"}
NA = "—"
NO_MASK = "n/a (causal)"


@dataclass
class FamilyComparison:
    families: dict[str, str]                  # model -> family name ("?" when it cannot be read)
    degradation: tuple[list[str], list[list[str]]]
    outliers: tuple[list[str], list[list[str]]]
    notes: list[str] = field(default_factory=list)


def family_of(model: str) -> str:
    from dllmq.study.cells import model_family
    return model_family(model) or "?"


def model_label(model: str, family: str) -> str:
    return f"{model} ({FAMILY_LABEL.get(family, family)})"


def unavailable_models(cells: Iterable[Mapping], reported: Iterable[str]) -> dict[str, str]:
    """model -> reason, for models whose cells were recorded unavailable and that have no results."""
    have = set(reported)
    out: dict[str, str] = {}
    for c in cells:
        if c.get("status") == "unavailable" and c["model"] not in have:
            out.setdefault(c["model"], str(c.get("error") or "not available"))
    return out


def _distance(ev: ModelEvidence | None, key: tuple[str, str], kl_ratio: float) -> Estimate | None:
    se = None if ev is None else ev.settings.get(key)
    if se is None:
        return None
    if se.kl_next is not None:
        return se.kl_next
    got = se.kl_at(kl_ratio)
    return None if got is None else got[1]


def _kl_name(ev: ModelEvidence | None, kl_ratio: float) -> str:
    settings = [] if ev is None else list(ev.settings.values())
    if any(s.kl_next is not None for s in settings):
        return "KL next-token"
    ratios = sorted({r for s in settings for r in s.kl})
    if not ratios:
        return "KL"
    return f"KL@{min(ratios, key=lambda x: (abs(x - kl_ratio), x)):g}"


def degradation_table(tables: list[ModelTable], evidence: Mapping[str, ModelEvidence], families: Mapping[str, str],
                      kl_ratio: float) -> tuple[list[str], list[list[str]]]:
    """Rows: every quantized setting (the paper's order), then the mean over the settings all models have."""
    head = ["setting"]
    for t in tables:
        label = model_label(t.model, families[t.model])
        head += [f"{label} Δacc", f"{label} {_kl_name(evidence.get(t.model), kl_ratio)}"]
    settings = sorted({r.setting for t in tables for r in t.quantized_rows()}, key=Setting.sort_key)
    body = []
    for s in settings:
        row = [s.label]
        for t in tables:
            ev = evidence.get(t.model)
            se = None if ev is None else ev.settings.get((s.method, s.bits))
            drop = None if se is None else se.drop.get("avg")
            row += [format_ci(drop, 1, neg=True), format_ci(_distance(ev, (s.method, s.bits), kl_ratio), 4)]
        body.append(row)
    shared = [s for s in settings
              if all(t.model in evidence and (s.method, s.bits) in evidence[t.model].settings for t in tables)]
    if len(shared) > 1:
        row = [f"mean over {len(shared)} settings"]
        for t in tables:
            ev = evidence[t.model]
            drops = [ev.settings[(s.method, s.bits)].drop.get("avg") for s in shared]
            dists = [_distance(ev, (s.method, s.bits), kl_ratio) for s in shared]
            row += [format_ci(mean_of(drops), 1, neg=True) if None not in drops else NA,
                    format_ci(mean_of(dists), 4) if None not in dists else NA]
        body.append(row)
    return head, body


def outlier_table(tables: list[ModelTable], evidence: Mapping[str, ModelEvidence], families: Mapping[str, str]
                  ) -> tuple[list[str], list[list[str]]]:
    """Rows: mask ratios, then position buckets (clean text); [] rows when no FP cell measured them."""
    models = [t.model for t in tables if evidence.get(t.model) and evidence[t.model].massive_ratio]
    if not models:
        return [], []
    head = ["massive tokens %"] + [model_label(m, families[m]) for m in models]
    ratios = sorted({r for m in models for r in evidence[m].massive_ratio})
    buckets = sorted({b for m in models for b in evidence[m].massive_pos}, key=lambda b: int(b.split("-")[0]))
    body = []
    for r in ratios:
        row = [f"mask ratio {r:g}"]
        for m in models:
            e = evidence[m].massive_ratio.get(r)
            causal = set(evidence[m].massive_ratio) == {0.0}   # profiled on clean text only: no mask token
            row.append(NO_MASK if e is None and causal else format_ci(e, 2, 100.0))
        body.append(row)
    for b in buckets:
        body.append([f"position {b} (clean text)"] + [format_ci(evidence[m].massive_pos.get(b), 2, 100.0) for m in models])
    return head, body


def family_comparison(tables: list[ModelTable], evidence: Mapping[str, ModelEvidence], kl_ratio: float,
                      unavailable: Mapping[str, str] | None = None) -> FamilyComparison | None:
    """The comparison when the reported models span two or more families (or a grid's family is missing)."""
    families = {t.model: family_of(t.model) for t in tables}
    order = list(FAMILY_LABEL)   # AR, LLaDA-style, Dream-style, then any other family
    tables = sorted(tables, key=lambda t: (order.index(families[t.model]) if families[t.model] in order
                                           else len(order), families[t.model]))
    unavailable = dict(unavailable or {})
    if len(set(families.values())) < 2 and not unavailable:
        return None
    notes = [f"{m}: not run ({reason.rstrip('.')})." for m, reason in sorted(unavailable.items())]
    if not any(e.settings for e in evidence.values()):
        notes.append("No per-item answers or measures in this database, so no paired comparison.")
    return FamilyComparison(families, degradation_table(tables, evidence, families, kl_ratio),
                            outlier_table(tables, evidence, families), notes)


FAMILY_NOTE = ("Each model against its own FP, paired, 95 % bootstrap CI in brackets. Δacc: overall accuracy change "
               "(points). KL: mean KL(p_FP || p) in nats per predicted token - at masked positions for a diffusion "
               "model (the report's mask ratio), of the next token given the true prefix for a causal model; each "
               "family's own prediction task, so compare a column's rows, and the families by their ranking of the "
               "methods rather than by KL values. Accuracy drops compare directly (same tasks and items).")
OUTLIER_NOTE = ("FP's activations on the measure windows: % of tokens carrying a massive value (|x| > 100 x the "
                "layer's median |x| and > 1, dllmq outliers' definition) in any block linear's input; per mask ratio "
                "(the positions masked at random, a causal model has no mask token) and, on clean text, per "
                "position (0 alone, then doubling ranges).")


__all__ = ["FAMILY_NOTE", "FamilyComparison", "OUTLIER_NOTE", "degradation_table", "family_comparison",
           "outlier_table", "unavailable_models"]
