"""Staged precision at inference: some denoising steps at high precision, the rest low-bit.

A diffusion LLM's first steps decide from an almost fully masked sequence, its last ones fill in the
few tokens left; a staged model runs the first (or last) fraction of the steps at high precision — the
full-precision weights ("fp") or an RTN W8A8 quantization of them ("w8a8") — and the rest with the
low-bit model, switching per step without reloading anything.

The staged model is the low-bit model in which every submodule that differs from the high-precision
model is replaced by a `PrecisionSwitch` holding both (a shared `PrecisionControl` says which runs);
everything equal in both (same type, same tensors, same settings) is held once. For RTN and GPTQ that
is every quantized linear; AWQ and SmoothQuant also switch the norms they folded scales into, QuaRot
the rotated embedding, norms and head, and a K/V quantizer switches against no hook at all. Both
precisions of the switched modules stay resident: the memory is the low-bit model plus the high side's
copies of those modules.

The schedule, written ``HIGH:WHERE=FRACTION`` (``fp:first=0.25``, ``w8a8:last=0.5``): with `steps`
denoising steps, round(FRACTION x steps) steps (halves round up) run high precision — the first ones
(``first``) or the last ones (``last``); steps count across LLaDA's blocks. Generation through
`dllmq.diffusion.generate` (the CLI, the mini evaluation, `dllmq bench`) follows the schedule of the
model it is given; called directly, a sampler runs the low-bit side unless its `before_step` is
`step_hook(model, steps)`.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from dllmq.errors import DllmqError

log = logging.getLogger(__name__)

HIGH_KINDS = ("fp", "w8a8")
PLACES = ("first", "last")
W8A8 = dict(method="rtn", wbits=8, abits=8)   # per-channel int8 weights, per-token int8 activations
SYNTAX = "HIGH:first=FRACTION or HIGH:last=FRACTION, HIGH fp or w8a8, FRACTION in [0, 1] (e.g. fp:first=0.25)"
_PATTERN = re.compile(r"^\s*(\w+)\s*:\s*(\w+)\s*=\s*([0-9.eE+-]+)\s*$")


# --- the schedule -------------------------------------------------------------------------------

@dataclass(frozen=True)
class StagedSpec:
    """Which high precision, and which fraction of the steps (the first or the last) runs it."""

    high: str = "fp"
    place: str = "first"
    fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.high not in HIGH_KINDS:
            raise DllmqError(f"Unknown high precision {self.high!r} for staged precision; "
                             f"use {' or '.join(HIGH_KINDS)}.")
        if self.place not in PLACES:
            raise DllmqError(f"Staged precision runs high precision first or last, not {self.place!r}; "
                             f"write {SYNTAX}.")
        if not (isinstance(self.fraction, (int, float)) and 0 <= self.fraction <= 1):
            raise DllmqError(f"The staged fraction must be between 0 and 1, got {self.fraction!r}.")

    def high_count(self, steps: int) -> int:
        """round(fraction x steps), halves up: first=0.25 of 10 steps is 3 (2.5 rounds up)."""
        return min(steps, math.floor(self.fraction * steps + 0.5))

    def high_steps(self, steps: int) -> range:
        """The 0-based indices of the steps that run high precision."""
        n = self.high_count(steps)
        return range(n) if self.place == "first" else range(steps - n, steps)

    def __str__(self) -> str:
        return f"{self.high}:{self.place}={self.fraction:g}"


def parse_staged(text: str | StagedSpec) -> StagedSpec:
    """``fp:first=0.25`` -> StagedSpec("fp", "first", 0.25); a bad value is one DllmqError sentence."""
    if isinstance(text, StagedSpec):
        return text
    m = _PATTERN.match(str(text))
    if not m:
        raise DllmqError(f"Cannot read the staged precision {text!r}; write {SYNTAX}.")
    high, place, value = m.groups()
    try:
        fraction = float(value)
    except ValueError:
        raise DllmqError(f"The staged fraction {value!r} is not a number; write {SYNTAX}.") from None
    if not math.isfinite(fraction):
        raise DllmqError(f"The staged fraction must be between 0 and 1, got {value}.")
    return StagedSpec(high.lower(), place.lower(), fraction)


# --- the switch ---------------------------------------------------------------------------------

class PrecisionControl:
    """The one flag every switch of a staged model reads: high precision now or not (low: the default)."""

    def __init__(self) -> None:
        self.high = False


class PrecisionSwitch(nn.Module):
    """Runs `high` or `low` (the same call, the same arguments) as its control says."""

    def __init__(self, high: nn.Module, low: nn.Module, control: PrecisionControl) -> None:
        super().__init__()
        self.high, self.low = high, low
        self.control = control          # a plain attribute: shared, not a submodule

    def forward(self, *args, **kwargs):
        return (self.high if self.control.high else self.low)(*args, **kwargs)


class Skip(nn.Module):
    """The side of a switch that has no module where the other has one (a K/V quantizer on `kv_hook`, an
    input transform): the model skips an absent hook, so this returns its input unchanged."""

    def forward(self, *args):
        return args[0] if len(args) == 1 else args


@dataclass
class Staged:
    """What a staged model carries (as ``model.staged``): its control, schedule and switched paths."""

    control: PrecisionControl
    spec: StagedSpec
    switched: list[str] = field(default_factory=list)


def staged_of(model: nn.Module) -> Staged | None:
    return getattr(model, "staged", None)


# --- building -----------------------------------------------------------------------------------

def _same_value(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.device == b.device and a.shape == b.shape and torch.equal(a, b))
    try:
        return bool(a == b)
    except Exception:  # an object without a usable ==: treat as different (the module is switched)
        return False


def _same_here(high: nn.Module, low: nn.Module, settings: bool = True) -> bool:
    """Same type, same own tensors and (with `settings`) same plain settings; children are not compared."""
    if type(high) is not type(low):
        return False
    for own in ("_parameters", "_buffers"):
        h, lo = getattr(high, own), getattr(low, own)
        if h.keys() != lo.keys() or not all(
                (h[k] is None) == (lo[k] is None) and (h[k] is None or _same_value(h[k], lo[k])) for k in h):
            return False
    if not settings:
        return True
    children = high._modules.keys() | low._modules.keys()
    plain = [{k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training" and k not in children}
             for m in (high, low)]
    return plain[0].keys() == plain[1].keys() and all(_same_value(plain[0][k], plain[1][k]) for k in plain[0])


def _merge(high: nn.Module, low: nn.Module, control: PrecisionControl, path: str, switched: list[str]) -> nn.Module:
    """`low` with each differing submodule replaced by a switch; equal ones are `low`'s, held once."""
    if not _same_here(high, low, settings=bool(path)):   # the root's config differs by its quantization
        switched.append(path)
        return PrecisionSwitch(high, low, control)
    for name in [*low._modules, *(n for n in high._modules if n not in low._modules)]:
        h, lo = high._modules.get(name), low._modules.get(name)
        if h is None and lo is None:
            continue
        where = f"{path}.{name}" if path else name
        if h is None or lo is None:
            switched.append(where)
            new = PrecisionSwitch(h if h is not None else Skip(), lo if lo is not None else Skip(), control)
        else:
            new = _merge(h, lo, control, where, switched)
        if new is not lo:
            setattr(low, name, new)
    return low


def _check_pair(high: nn.Module, low: nn.Module) -> None:
    hc, lc = high.config, low.config
    shape = ("family", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "vocab_size")
    diff = [f"{k} {getattr(hc, k)} vs {getattr(lc, k)}" for k in shape if getattr(hc, k) != getattr(lc, k)]
    if diff:
        raise DllmqError(f"The high-precision model is not the one the low-bit model was quantized from "
                         f"({'; '.join(diff)}); give the full-precision model it came from.")
    if high.family.causal:
        raise DllmqError(f"Staged precision switches between denoising steps; {high.family.name} is an "
                         "autoregressive family, so it has none.")


def stage(high: nn.Module, low: nn.Module, spec: StagedSpec | str) -> nn.Module:
    """`low`, changed in place into the staged model of `high` and `low` (same architecture, same dtype
    and device) with schedule `spec`; `high` must not be used on its own afterwards (its equal parts are
    dropped in favour of `low`'s)."""
    spec = parse_staged(spec)
    _check_pair(high, low)
    if staged_of(low) is not None or staged_of(high) is not None:
        raise DllmqError("This model is already staged; stage the plain low-bit and high-precision models.")
    control, switched = PrecisionControl(), []
    merged = _merge(high, low, control, "", switched)
    if merged is not low:
        raise DllmqError("The high-precision and low-bit models are different kinds of model; give the "
                         "full-precision model the low-bit one was quantized from.")
    if not switched:
        log.warning("Staged precision: the high-precision and low-bit models are identical; nothing switches.")
    low.staged = Staged(control, spec, switched)
    log.info("staged %s: %d modules switch precision, the rest are shared", spec, len(switched))
    return low


def high_side(fp: nn.Module, kind: str, backend: str) -> nn.Module:
    """The high-precision model: `fp` itself, or an RTN W8A8 quantization of it on `backend`."""
    if kind == "fp":
        return fp
    from dllmq.quant.api import quantize
    from dllmq.quant.backend import set_backend
    from dllmq.quant.config import QuantConfig
    quantize(fp, None, QuantConfig(**W8A8), device=next(fp.parameters()).device, progress=False)
    set_backend(fp, backend)
    return fp


def staged_from_fp(fp: nn.Module, tokenizer, low_config, spec: StagedSpec | str, *, backend: str = "kernel",
                   device: str | torch.device = "cpu", progress: bool = False) -> nn.Module:
    """Quantize a copy of the full-precision `fp` with `low_config` (a QuantConfig) and stage it against
    `fp` (or its W8A8 quantization, per `spec`). `fp` becomes part of the staged model."""
    from dllmq.quant.api import quantize
    from dllmq.quant.backend import set_backend
    spec = parse_staged(spec)
    low = copy.deepcopy(fp)
    quantize(low, tokenizer, low_config, device=device, progress=progress)
    set_backend(low, backend)
    return stage(high_side(fp, spec.high, backend), low, spec)


def load_staged(quantized: str | os.PathLike, source: str | os.PathLike, spec: StagedSpec | str, *,
                backend: str = "kernel", dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
                seed: int = 0):
    """(model, tokenizer, family): the quantized checkpoint `quantized` staged against the full-precision
    model `source` it was quantized from (or that model's W8A8 quantization, per `spec`); both loaded
    with the same dtype and device, the quantized layers of both on `backend`."""
    from dllmq.api import load_model
    from dllmq.quant.backend import KernelLinear
    from dllmq.quant.qlinear import QuantLinear
    from dllmq.quant.qlinear_fp import FPQuantLinear
    spec = parse_staged(spec)
    low = load_model(quantized, dtype=dtype, device=device, seed=seed, backend=backend)
    if not any(isinstance(m, (QuantLinear, FPQuantLinear, KernelLinear)) for m in low.model.modules()):
        raise DllmqError(f"{quantized} is a full-precision model; staged precision runs a quantized model (make one "
                         "with `dllmq quantize`) against the full-precision model it came from.")
    fp = load_model(source, dtype=dtype, device=device, seed=seed, backend=backend)
    if any(isinstance(m, (QuantLinear, FPQuantLinear, KernelLinear)) for m in fp.model.modules()):
        raise DllmqError(f"The staged source {source} is itself quantized; give the full-precision model.")
    model = stage(high_side(fp.model, spec.high, backend), low.model, spec)
    return low._replace(model=model)


# --- generation -------------------------------------------------------------------------------

def step_hook(model: nn.Module, steps: int, spec: StagedSpec | str | None = None):
    """The sampler's `before_step` for a staged model with `steps` steps (`spec` overrides the model's
    schedule): sets its control to high precision exactly on the scheduled steps."""
    staged = staged_of(model)
    if staged is None:
        raise DllmqError("Staged precision needs a staged model (dllmq.quant.staged: load_staged or "
                         "staged_from_fp), which holds both precisions; this one holds one.")
    spec = staged.spec if spec is None else parse_staged(spec)
    if spec.high != staged.spec.high:
        raise DllmqError(f"This staged model's high precision is {staged.spec.high}, not {spec.high}; build it "
                         f"with {spec.high} to run {spec}.")
    high = set(spec.high_steps(steps))
    control = staged.control

    def before_step(step: int) -> None:
        control.high = step in high
    return before_step
