"""The result of an outlier profile: per-linear statistics at each mask ratio, JSON, the terminal
summary and the atomic writer of the report directory. Definitions: see dllmq.analysis.outliers."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from dllmq.errors import DllmqError

JSON_NAME = "outliers.json"


@dataclass(frozen=True)
class OutlierThresholds:
    """The outlier definitions (see the dllmq.analysis.outliers docstring), as numbers."""

    normal_ratio: float = 10.0     # |x| above this many window medians ...
    normal_min_frac: float = 0.5   # ... on at least this fraction of tokens: a normal outlier channel
    massive_ratio: float = 100.0   # a single |x| above this many window medians ...
    massive_floor: float = 1.0     # ... and above this absolute value: a massive value
    top_k: int = 8                 # channels / tokens listed by magnitude per linear
    max_listed: int = 64           # cap on listed outlier channels and massive token positions

    def __post_init__(self) -> None:
        if self.normal_ratio <= 0 or self.massive_ratio <= 0 or self.massive_floor < 0:
            raise DllmqError("Outlier thresholds must be positive (the massive floor may be 0).")
        if not 0.0 < self.normal_min_frac <= 1.0:
            raise DllmqError(f"normal_min_frac must be in (0, 1], got {self.normal_min_frac}.")
        if self.top_k < 1 or self.max_listed < 1:
            raise DllmqError("top_k and max_listed must be at least 1.")


# --- the report ------------------------------------------------------------------------------------

def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass
class LinearStats:
    """Everything recorded for one linear's input at one mask ratio.

    The tensors (`channel_max` [C], `token_max` [windows, T], `massive_token` [windows, T] bool) are
    kept for analysis and plots; `to_dict` writes their summaries (top channels, token quantiles,
    listed positions), not the arrays.
    """

    block: int
    name: str                  # path inside the block, e.g. "ff_out"
    kind: str                  # the family's group: qkv, attn_out, gate_up, down
    transformed: bool          # recorded after an online input transform
    in_features: int
    n_tokens: int
    max_abs: float
    median_abs: float
    mean: float
    std: float
    kurtosis: float
    channel_max: torch.Tensor
    token_max: torch.Tensor
    window_median: torch.Tensor
    normal_fraction: torch.Tensor   # [C] fraction of tokens above normal_ratio * m_w
    massive_channel: torch.Tensor   # [C] massive values per channel
    massive_token: torch.Tensor     # [windows, T] bool

    @property
    def layer(self) -> str:
        return f"{self.block}.{self.name}"

    @property
    def massive_count(self) -> int:
        return int(self.massive_channel.sum())

    @property
    def massive_token_fraction(self) -> float:
        return float(self.massive_token.float().mean())

    def normal_channels(self, thresholds: OutlierThresholds) -> list[int]:
        """Channels that are normal outliers, largest token fraction first."""
        hits = (self.normal_fraction >= thresholds.normal_min_frac).nonzero().flatten()
        order = self.normal_fraction[hits].argsort(descending=True, stable=True)
        return hits[order].tolist()

    def massive_channels(self) -> list[int]:
        """Channels holding massive values, most first."""
        hits = self.massive_channel.nonzero().flatten()
        order = self.massive_channel[hits].argsort(descending=True, stable=True)
        return hits[order].tolist()

    def massive_positions(self) -> list[tuple[int, int]]:
        """(window, position) of every token carrying a massive value, in order."""
        return [tuple(p) for p in self.massive_token.nonzero().tolist()]

    def to_dict(self, thresholds: OutlierThresholds, is_mask: torch.Tensor | None = None) -> dict[str, Any]:
        k = min(thresholds.top_k, self.in_features)
        top_c = self.channel_max.topk(k)
        flat = self.token_max.reshape(-1)
        top_t = flat.topk(min(thresholds.top_k, flat.numel()))
        seqlen = self.token_max.shape[1]
        normal = self.normal_channels(thresholds)
        listed_normal = [[c, float(self.normal_fraction[c])] for c in normal[:thresholds.max_listed]]
        massive_ch = self.massive_channels()
        positions = self.massive_positions()
        massive: dict[str, Any] = {
            "count": self.massive_count,
            "n_tokens": len(positions),
            "token_fraction": self.massive_token_fraction,
            "channels": [[c, int(self.massive_channel[c])] for c in massive_ch[:thresholds.max_listed]],
            "n_channels": len(massive_ch),
            "tokens": [list(p) for p in positions[:thresholds.max_listed]],
        }
        if is_mask is not None and len(positions):
            massive["mask_token_share"] = float(self.massive_token[is_mask].sum()) / len(positions)
        return {
            "block": self.block, "name": self.name, "kind": self.kind, "transformed": self.transformed,
            "in_features": self.in_features, "n_tokens": self.n_tokens,
            "max_abs": self.max_abs, "median_abs": self.median_abs,
            "max_over_median": _finite(self.max_abs / self.median_abs) if self.median_abs > 0 else None,
            "mean": self.mean, "std": self.std, "kurtosis": _finite(self.kurtosis),
            "top_channels": [[int(c), float(v)] for v, c in zip(top_c.values, top_c.indices)],
            "token_max_quantiles": {q: float(flat.quantile(p)) for q, p in
                                    (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))},
            "top_tokens": [[int(i) // seqlen, int(i) % seqlen, float(v)] for v, i in zip(top_t.values, top_t.indices)],
            "normal_outliers": {"n_channels": len(normal), "channels": listed_normal},
            "massive": massive,
        }


@dataclass
class RatioProfile:
    """All linears at one mask ratio, plus which tokens carry massive values anywhere in the model."""

    mask_ratio: float
    is_mask: torch.Tensor               # [windows, T] bool: the input token is the mask token
    linears: list[LinearStats]

    def massive_tokens(self, kind: str | None = None) -> torch.Tensor:
        """[windows, T] bool: a massive value in any linear (of `kind`, when given)."""
        out = torch.zeros_like(self.is_mask)
        for s in self.linears:
            if kind is None or s.kind == kind:
                out |= s.massive_token
        return out

    def massive_token_fraction(self, kind: str | None = None) -> float:
        return float(self.massive_tokens(kind).float().mean())

    def fraction_by_token_type(self) -> dict[str, float | None]:
        """Fraction of mask tokens / of text tokens carrying a massive value (None when there are none)."""
        any_massive = self.massive_tokens()
        return {label: float(any_massive[sel].float().mean()) if sel.any() else None
                for label, sel in (("masked", self.is_mask), ("unmasked", ~self.is_mask))}

    def to_dict(self, thresholds: OutlierThresholds) -> dict[str, Any]:
        any_massive = self.massive_tokens()
        kinds = list(dict.fromkeys(s.kind for s in self.linears))
        split = self.fraction_by_token_type()
        return {
            "mask_ratio": self.mask_ratio,
            "n_tokens": int(self.is_mask.numel()),
            "n_masked": int(self.is_mask.sum()),
            "massive_token_fraction": float(any_massive.float().mean()),
            "massive_token_fraction_by_kind": {k: self.massive_token_fraction(k) for k in kinds},
            "massive_token_fraction_by_token_type": split,
            "n_linears_with_massive": sum(1 for s in self.linears if s.massive_count),
            "n_normal_outlier_channels": sum(len(s.normal_channels(thresholds)) for s in self.linears),
            "linears": [s.to_dict(thresholds, self.is_mask) for s in self.linears],
        }


@dataclass
class Surface:
    """|x| of one linear's input for window 0 at one mask ratio, max-pooled to at most a plot's size."""

    block: int
    name: str
    kind: str
    mask_ratio: float
    matrix: torch.Tensor          # [tokens', channels'] float32, max-pooled
    shape: tuple[int, int]        # (tokens, channels) before pooling

    @property
    def layer(self) -> str:
        return f"{self.block}.{self.name}"


@dataclass
class OutlierReport:
    model: str
    family: str
    settings: dict[str, Any]
    thresholds: OutlierThresholds
    profiles: list[RatioProfile]
    surfaces: list[Surface] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)   # file names, filled by write_outlier_report

    @property
    def mask_ratios(self) -> list[float]:
        return [p.mask_ratio for p in self.profiles]

    def profile(self, mask_ratio: float) -> RatioProfile:
        for p in self.profiles:
            if math.isclose(p.mask_ratio, mask_ratio):
                return p
        raise KeyError(f"no profile at mask ratio {mask_ratio}")

    def linear(self, block: int, name: str, mask_ratio: float = 0.0) -> LinearStats:
        for s in self.profile(mask_ratio).linears:
            if s.block == block and s.name == name:
                return s
        raise KeyError(f"no linear {block}.{name}")

    def to_dict(self) -> dict[str, Any]:
        t = self.thresholds
        return {
            "model": self.model, "family": self.family, "settings": self.settings,
            "thresholds": {k: getattr(t, k) for k in t.__dataclass_fields__},
            "definitions": {
                "median_abs": "median over windows of the window's median |x| (lower median)",
                "kurtosis": "Pearson kurtosis of all values (3 for a Gaussian)",
                "normal_outlier": "channel with |x| > normal_ratio * window median |x| on >= normal_min_frac of tokens",
                "massive": "value with |x| > max(massive_ratio * window median |x|, massive_floor)",
                "transformed": "input recorded after the layer's online transform (what its quantizer sees)",
            },
            "mask_ratios": self.mask_ratios, "notes": self.notes, "plots": self.plots,
            "surfaces": [{"block": s.block, "name": s.name, "kind": s.kind, "mask_ratio": s.mask_ratio,
                          "window": 0, "shape": list(s.shape), "pooled_shape": list(s.matrix.shape)}
                         for s in self.surfaces],
            "profiles": [p.to_dict(t) for p in self.profiles],
        }


# --- output ----------------------------------------------------------------------------------------

def format_summary(report: OutlierReport, worst: int = 5) -> str:
    """A few lines for the terminal: worst layers, where massive outliers sit, token fractions by mask ratio."""
    t = report.thresholds
    s0 = report.settings
    lines = [f"{report.model} ({report.family}): {s0['nsamples']} x {s0['seqlen']} tokens of {s0['calib']}, "
             f"mask ratios {', '.join(f'{r:g}' for r in report.mask_ratios)}"]
    lines += [f"note: {n}" for n in report.notes]
    base = report.profiles[0]
    lines.append(f"worst linears at mask ratio {base.mask_ratio:g} (max |x|; median, kurtosis):")
    seen: set[tuple[int, str]] = set()
    for s in sorted(base.linears, key=lambda s: -s.max_abs):
        if (s.block, s.kind) in seen:
            continue  # q/k/v (gate/up) read the same input: list the group once
        seen.add((s.block, s.kind))
        lines.append(f"  block {s.block:>3} {s.name:<10} {s.kind:<8} max {s.max_abs:10.4g}  median {s.median_abs:9.3g}"
                     f"  kurtosis {s.kurtosis:9.4g}" + ("  (after online transform)" if s.transformed else ""))
        if len(seen) == worst:
            break
    normal = [(s, s.normal_channels(t)) for s in base.linears]
    normal = [(s, ch) for s, ch in normal if ch]
    if normal:
        lines.append(f"normal outlier channels at ratio {base.mask_ratio:g}: " + "; ".join(
            f"{s.layer} {ch[:4]}" for s, ch in normal[:6]) + (" ..." if len(normal) > 6 else ""))
    massive = [s for s in base.linears if s.massive_count]
    if massive:
        by_kind: dict[str, int] = {}
        for s in massive:
            by_kind[s.kind] = by_kind.get(s.kind, 0) + 1
        top = max(massive, key=lambda s: s.massive_count)
        positions = sorted({p for _, p in top.massive_positions()})
        lines.append(f"massive outliers at ratio {base.mask_ratio:g} in {len(massive)} linears ("
                     + ", ".join(f"{k} {v}" for k, v in by_kind.items())
                     + f"); most in {top.layer}: channels {top.massive_channels()[:4]}, positions {positions[:8]}"
                     + (" ..." if len(positions) > 8 else ""))
    else:
        lines.append(f"no massive outliers at ratio {base.mask_ratio:g} "
                     f"(|x| > {t.massive_ratio:g} x median and > {t.massive_floor:g})")
    lines.append("tokens carrying a massive outlier (any linear), by mask ratio:")
    for p in report.profiles:
        d = p.fraction_by_token_type()
        split = "" if d["masked"] is None or d["unmasked"] is None else \
            f"   (masked tokens {100 * d['masked']:.1f}%, unmasked {100 * d['unmasked']:.1f}%)"
        lines.append(f"  {p.mask_ratio:>5g}: {100 * p.massive_token_fraction():6.2f}%{split}")
    return "\n".join(lines)
