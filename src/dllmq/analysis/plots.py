"""PNG plots of an outlier report (matplotlib, Agg backend, imported only when a plot is drawn).

File names are stable so reports can be compared side by side:
- surface_block{B}_{linear}.png   token x channel |x| of window 0, one 3D panel per captured mask ratio;
- max_abs_by_depth.png            per-block max |x| of each linear kind, one panel per mask ratio;
- massive_tokens_vs_mask_ratio.png  fraction of tokens carrying a massive value vs the mask ratio.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dllmq.analysis.outlier_report import OutlierReport, Surface

DEPTH_NAME = "max_abs_by_depth.png"
MASSIVE_NAME = "massive_tokens_vs_mask_ratio.png"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)  # no display; never open a window
    import matplotlib.pyplot as plt
    return plt


def surface_name(block: int, name: str) -> str:
    return f"surface_block{block}_{name.replace('.', '_')}.png"


def plot_surface(surfaces: list[Surface], path: Path) -> Path:
    """One layer's |x| over (token, channel) as 3D surfaces, one per mask ratio, like the paper's figures."""
    plt = _pyplot()
    fig = plt.figure(figsize=(5.5 * len(surfaces), 4.5))
    zmax = max(float(s.matrix.max()) for s in surfaces) or 1.0
    for i, s in enumerate(surfaces):
        ax = fig.add_subplot(1, len(surfaces), i + 1, projection="3d")
        z = s.matrix.numpy()
        tokens, channels = s.shape
        # pooled bins are labelled with the original channel / token index they start at
        x = np.linspace(0, channels, z.shape[1], endpoint=False)
        y = np.linspace(0, tokens, z.shape[0], endpoint=False)
        xx, yy = np.meshgrid(x, y)
        ax.plot_surface(xx, yy, z, cmap="coolwarm", linewidth=0, antialiased=False, vmin=0, vmax=zmax)
        ax.set_zlim(0, zmax)
        ax.set_xlabel("channel")
        ax.set_ylabel("token")
        ax.set_zlabel("|x|")
        ax.set_title(f"mask ratio {s.mask_ratio:g}", fontsize=10)
    first = surfaces[0]
    fig.suptitle(f"input of block {first.block} {first.name} ({first.kind}), window 0")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_max_by_depth(report: OutlierReport, path: Path) -> Path:
    """Max |x| of each linear kind's input across depth, log scale, one panel per mask ratio."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    n = len(report.profiles)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows), sharey=True, squeeze=False)
    flat = axes.reshape(-1)
    for ax in flat[n:]:
        ax.set_visible(False)
    for ax, profile in zip(flat, report.profiles):
        kinds = list(dict.fromkeys(s.kind for s in profile.linears))
        for kind in kinds:
            by_block: dict[int, float] = {}
            for s in profile.linears:
                if s.kind == kind:
                    by_block[s.block] = max(by_block.get(s.block, 0.0), s.max_abs)
            blocks = sorted(by_block)
            ax.plot(blocks, [max(by_block[b], 1e-12) for b in blocks], marker="o", markersize=3, label=kind)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("block")
        ax.set_title(f"mask ratio {profile.mask_ratio:g}", fontsize=10)
        ax.grid(True, alpha=0.3)
    for row in axes:
        row[0].set_ylabel("max |x| of the input")
    flat[0].legend(fontsize=8)
    fig.suptitle(f"{report.model}: input magnitude by depth")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_massive_vs_mask(report: OutlierReport, path: Path) -> Path:
    """Fraction of tokens carrying at least one massive value (any linear, and per kind) vs mask ratio."""
    plt = _pyplot()
    ratios = report.mask_ratios
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    ax.plot(ratios, [p.massive_token_fraction() for p in report.profiles], marker="o", color="black",
            linewidth=2, label="any linear")
    kinds = list(dict.fromkeys(s.kind for s in report.profiles[0].linears))
    for kind in kinds:
        ax.plot(ratios, [p.massive_token_fraction(kind) for p in report.profiles], marker=".", linestyle="--",
                label=kind)
    ax.set_xlabel("mask ratio of the input")
    ax.set_ylabel("fraction of tokens with a massive value")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{report.model}: massive outliers vs masking", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_all(report: OutlierReport, out_dir: Path) -> list[Path]:
    """Every plot of `report` into `out_dir`; returns the files in a stable order."""
    out_dir = Path(out_dir)
    paths = []
    layers: dict[tuple[int, str], list[Surface]] = {}
    for s in report.surfaces:
        layers.setdefault((s.block, s.name), []).append(s)
    for (block, name), group in layers.items():
        paths.append(plot_surface(group, out_dir / surface_name(block, name)))
    paths.append(plot_max_by_depth(report, out_dir / DEPTH_NAME))
    paths.append(plot_massive_vs_mask(report, out_dir / MASSIVE_NAME))
    return paths
