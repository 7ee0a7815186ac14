"""The settings every method shares (weight, activation, K/V and calibration specs) and the base of
each method's own settings.

A method's settings are a frozen dataclass whose fields are declared with `setting(...)`: the
default, one line of help and, for the ones the command line exposes, the flag. The CLI builds its
method flags from these declarations, the study config validates its overrides against them, and a
saved model records them, all under the field names used here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from dllmq.errors import DllmqError
from dllmq.quant.formats import FORMATS, Format
from dllmq.quant.primitives import QuantSpec

NOT_QUANTIZED = 16  # activation / K/V bits meaning "left in full precision"


@dataclass(frozen=True)
class WeightSpec:
    """How block weights are rounded: bits, inputs per scale (-1 = per output channel), symmetry, clip."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    clip: float = 1.0
    format: str = "int"   # dllmq.quant.formats: int, fp8, mxfp4, nvfp4
    signed_grid: bool = False   # symmetric scale max / (2^(b-1) - 1) (QuaRot's code; set by the method)
    study_grid: bool = False    # the study's asymmetric grid (SmoothQuant / DuQuant's code; set by the method)

    @property
    def fmt(self) -> Format:
        return FORMATS[self.format]

    def quant_spec(self) -> QuantSpec:
        if self.group_size == -1:
            return QuantSpec(bits=self.bits, symmetric=self.sym, granularity="channel", clip_ratio=self.clip,
                             signed_grid=self.signed_grid, study_grid=self.study_grid)
        return QuantSpec(bits=self.bits, symmetric=self.sym, granularity="group", group_size=self.group_size,
                         clip_ratio=self.clip, signed_grid=self.signed_grid, study_grid=self.study_grid)


@dataclass(frozen=True)
class ActSpec:
    """Per-token activation quantization at every block linear's input (bits 16 = off)."""

    bits: int = NOT_QUANTIZED
    sym: bool = False
    clip: float = 1.0
    format: str = "int"   # dllmq.quant.formats: int, fp8, mxfp4, nvfp4

    @property
    def fmt(self) -> Format:
        return FORMATS[self.format]

    @property
    def enabled(self) -> bool:
        return self.bits < NOT_QUANTIZED


@dataclass(frozen=True)
class KVSpec:
    """K and V quantized per head in groups where attention reads them (bits 16 = off)."""

    bits: int = NOT_QUANTIZED
    group_size: int = 128
    clip: float = 0.95

    @property
    def enabled(self) -> bool:
        return self.bits < NOT_QUANTIZED


@dataclass(frozen=True)
class CalibSpec:
    """The calibration text: a source name or file, and how many windows of how many tokens, cut at random
    starts (`random`) or, with `documents`, from `nsamples` short documents concatenated (AWQ's way); masked
    (`mask_schedule`) and token-weighted (`weighting`) for a diffusion model when asked."""

    source: str = "wiki"
    nsamples: int = 128
    seqlen: int = 2048
    windows: str = "random"
    group_order: str = "execution"   # the order a sequential method calibrates a block's groups in
    # dLLM-aware calibration (dllmq.quant.dllm_calib): the mask ratios of the windows and the token weights
    mask_schedule: str = "none"
    weighting: str = "none"


STUDY_GRID_HELP = ("weights (per output channel) and activations (per token) on the study code's asymmetric grid: "
                   "min and max not widened to include zero, scale kept in [1e-5, 1e4] (docs/fidelity.md)")


def setting(default: Any, help: str, *, flag: str | None = None, invert: bool = False,
            choices: tuple[str, ...] | None = None, optional: bool = False) -> Any:
    """A method setting: its default, one line of help and, when the CLI exposes it, its flag. A
    boolean flag sets True, or False with `invert` (e.g. --no-clip for clip=True). An `optional`
    setting is listed in the flat form only where it differs from its default, so adding one leaves
    the saved configs and study keys of runs that do not use it as they were."""
    return field(default=default, metadata={"help": help, "flag": flag, "invert": invert, "choices": choices,
                                            "optional": optional})


@dataclass(frozen=True)
class MethodSettings:
    """A method's own settings (none here). Subclasses add `setting(...)` fields and may check them."""

    # Settings added after configs were first saved, with the behaviour those configs ran: a stored
    # config that lacks one of them is read with this value, not today's default.
    STORED_BEFORE: ClassVar[dict[str, Any]] = {}

    def check(self) -> None:
        """Raise DllmqError for a value the method cannot use."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def build(cls, method: str, values: dict[str, Any]) -> "MethodSettings":
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            own = f"its settings are {', '.join(cls.names())}" if cls.names() else "it has no settings of its own"
            raise DllmqError(f"{method} does not take {', '.join(unknown)}; {own}.")
        settings = cls(**values)
        settings.check()
        return settings

    @classmethod
    def listed_names(cls) -> tuple[str, ...]:
        """The settings a flat form always lists (the optional ones only where set otherwise)."""
        return tuple(f.name for f in fields(cls) if not f.metadata.get("optional"))

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        return {f.name: values[f.name] for f in fields(self)
                if not (f.metadata.get("optional") and values[f.name] == f.default)}

