"""Degradation plots of a study (matplotlib, Agg backend, imported only when a plot is drawn).

One figure per model: a panel per category average plus the overall average; in each panel the bars
are grouped by method, one bar per bit width (the same colour for a bit width in every panel), height
= drop versus FP in points (up = worse), with the moderate (1) and severe (4) edges drawn as lines.
"""
from __future__ import annotations

import io
import re

from dllmq.study.grid import MODERATE_AT, SEVERE_ABOVE, ModelTable, Setting, method_name

# Weight-only bit widths in blues, weight-activation in oranges/reds, anything else in greys.
_COLOURS = {"W4A16": "#6baed6", "W3A16": "#08519c", "W8A8": "#fdae6b", "W4A4": "#d94801"}
_SPARE = ("#74c476", "#238b45", "#9e9ac8", "#54278f", "#969696", "#252525")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)  # no display; never open a window
    import matplotlib.pyplot as plt
    return plt


def plot_name(model: str, taken: set[str]) -> str:
    """A file name for a model's figure, unique among `taken` (model names may be paths)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model.strip("/\\")).strip("._") or "model"
    name, k = f"degradation_{slug}.png", 2
    while name in taken:
        name, k = f"degradation_{slug}_{k}.png", k + 1
    taken.add(name)
    return name


def _bits_key(bits: str) -> str:
    return re.sub(r"-.*$", "", bits.upper())


def degradation_png(table: ModelTable, dpi: int = 100) -> bytes | None:
    """The model's degradation figure as PNG bytes; None when it has no drops to draw."""
    rows = [r for r in table.quantized_rows() if r.overall.drop is not None
            or any(c.drop is not None for c in r.categories.values())]
    if not rows:
        return None
    plt = _pyplot()
    panels = [(c, c) for c in table.categories] + [("average", None)]
    methods = list(dict.fromkeys(r.setting.method for r in rows))          # table order
    bits = list(dict.fromkeys(r.setting.bits for r in rows))
    colours, spare = {}, iter(_SPARE * 4)
    for b in bits:
        colours[b] = _COLOURS.get(_bits_key(b)) or next(spare)
    by_key = {(r.setting.method, r.setting.bits): r for r in rows}

    ncols = 1 if len(panels) == 1 else 2
    nrows = -(-len(panels) // ncols)
    panel_w = max(4.0, 0.75 * len(methods) + 1.5)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_w * ncols + 1.2, 3.3 * nrows + 0.5), sharey=True,
                             squeeze=False)
    flat = [ax for line in axes for ax in line]
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    width = 0.8 / max(1, max(sum((m, b) in by_key for b in bits) for m in methods))
    drawn: dict[str, object] = {}
    for ax, (title, cat) in zip(flat, panels):
        for x, m in enumerate(methods):
            present = [b for b in bits if (m, b) in by_key]
            for j, b in enumerate(present):
                row = by_key[(m, b)]
                cell = row.overall if cat is None else row.categories.get(cat)
                if cell is None or cell.drop is None:
                    continue
                pos = x + (j - (len(present) - 1) / 2) * width
                err = cell.drop_stderr if cell.drop_stderr is not None else None
                bar = ax.bar(pos, cell.drop, width * 0.95, color=colours[b], yerr=err, capsize=2,
                             error_kw={"elinewidth": 0.8, "ecolor": "#444444"})
                drawn.setdefault(b, bar)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.axhline(MODERATE_AT, color="#b8860b", linewidth=0.8, linestyle="--")
        ax.axhline(SEVERE_ABOVE, color="#b22222", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels([method_name(m) for m in methods], rotation=30, ha="right", fontsize=8)
        ax.set_title(title if cat is None else f"{title} average", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for line in axes:
        line[0].set_ylabel("drop vs FP (points, up = worse)", fontsize=9)
    order = [b for b in sorted(bits, key=lambda b: Setting("x", b).sort_key()) if b in drawn]
    fig.legend([drawn[b] for b in order], order, loc="upper right", fontsize=8, title="bits", title_fontsize=8)
    fig.suptitle(f"{table.model}: degradation vs FP (dashed: moderate 1, severe 4)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 1.2 / (panel_w * ncols + 1.2), 0.95))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})  # no version stamp: same bytes each run
    plt.close(fig)
    return buf.getvalue()


# --- the paired measures vs FP ---------------------------------------------------------------------------------
_LINESTYLES = {"W4A16": "-", "W3A16": "--", "W8A8": ":", "W4A4": "-."}


def _method_colours(evidence) -> dict[str, str]:
    methods = sorted({k[0] for ev in evidence.values() for k in ev.settings}, key=lambda m: Setting(m, "W4A16").sort_key())
    cmap = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
    return {m: cmap[i % len(cmap)] for i, m in enumerate(methods)}


def _save(fig, plt, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def kl_ratio_png(tables, evidence, dpi: int = 100) -> bytes | None:
    """KL(FP || cell) vs mask ratio: one panel per model, one line per method x bits (log scale, CI bands)."""
    models = [t.model for t in tables if t.model in evidence and evidence[t.model].has_kl]
    if not models:
        return None
    plt = _pyplot()
    colours = _method_colours({m: evidence[m] for m in models})
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models) + 1.8, 4.0), squeeze=False, sharey=True)
    handles: dict[str, object] = {}
    for ax, model in zip(axes[0], models):
        ev = evidence[model]
        for key in sorted(ev.settings, key=lambda k: Setting(*k).sort_key()):
            se = ev.settings[key]
            if not se.kl:
                continue
            ratios = sorted(se.kl)
            cis = [se.kl[r].ci() for r in ratios]
            vals = [max(c.value, 1e-8) for c in cis]
            style = _LINESTYLES.get(_bits_key(key[1]), "-")
            line, = ax.plot(ratios, vals, style, marker="o", markersize=3, color=colours[key[0]], linewidth=1.2)
            ax.fill_between(ratios, [max(c.lo, 1e-8) for c in cis], [max(c.hi, 1e-8) for c in cis],
                            color=colours[key[0]], alpha=0.12, linewidth=0)
            handles.setdefault(Setting(*key).label, line)
        ax.set_yscale("log")
        ax.set_xlabel("mask ratio", fontsize=9)
        ax.set_title(model, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("KL(p_FP || p) per masked token (nats)", fontsize=9)
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=7)
    fig.suptitle("Masked-prediction KL to FP by mask ratio (band: 95 % CI over windows)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 1.8 / (5.2 * len(models) + 1.8), 0.94))
    return _save(fig, plt, dpi)


def trajectory_png(tables, evidence, dpi: int = 100) -> bytes | None:
    """Teacher-forced flip rate by denoising step: one panel per model x generation task, a line per setting."""
    panels = [(t.model, task) for t in tables if t.model in evidence
              for task in sorted({x for s in evidence[t.model].settings.values() for x in s.traj_steps})]
    if not panels:
        return None
    plt = _pyplot()
    colours = _method_colours({m: evidence[m] for m in {p[0] for p in panels}})
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.6 * ncols + 1.8, 3.4 * nrows + 0.4), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    handles: dict[str, object] = {}
    for ax, (model, task) in zip(flat, panels):
        ev = evidence[model]
        for key in sorted(ev.settings, key=lambda k: Setting(*k).sort_key()):
            steps = ev.settings[key].traj_steps.get(task)
            if not steps:
                continue
            style = _LINESTYLES.get(_bits_key(key[1]), "-")
            line, = ax.plot(range(1, len(steps) + 1), steps, style, color=colours[key[0]], linewidth=1.1)
            handles.setdefault(Setting(*key).label, line)
        causal = any(s.kl_next is not None for s in ev.settings.values())   # an AR model: FP's continuation
        ax.set_title(f"{model}: {task}" + (" (causal: greedy continuation)" if causal else ""), fontsize=10)
        ax.set_xlabel("generated token" if causal else "denoising step", fontsize=9)
        ax.set_ylabel("flipped (fraction of items)", fontsize=9)
        ax.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=7)
    fig.suptitle("Where denoising departs from FP (teacher-forced on FP's trajectory)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 1.8 / (5.6 * ncols + 1.8), 0.94))
    return _save(fig, plt, dpi)
