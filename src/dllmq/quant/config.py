"""Quantization settings: one dataclass with the reference implementations' defaults, and the presets."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from dllmq.errors import DllmqError

WEIGHT_ONLY_METHODS = ("rtn", "gptq", "awq")
WEIGHT_ACTIVATION_METHODS = ("smoothquant", "quarot", "duquant")
METHODS = WEIGHT_ONLY_METHODS + WEIGHT_ACTIVATION_METHODS

# The study's settings per weight-activation method (REFERENCE.md), used where a field is left None.
# The reference clip ratios are tuned for 4-bit; at 6+ activation bits clipping only adds error, so
# they apply when abits <= 4 and are 1.0 otherwise.
_WA_DEFAULTS = {
    "rtn": dict(alpha=None, act_sym=False, low_bit_act_clip=1.0, low_bit_weight_clip=1.0, sym=False),
    "smoothquant": dict(alpha=0.5, act_sym=False, low_bit_act_clip=1.0, low_bit_weight_clip=1.0, sym=False),
    "quarot": dict(alpha=None, act_sym=True, low_bit_act_clip=0.9, low_bit_weight_clip=1.0, sym=True),
    "duquant": dict(alpha=0.6, act_sym=False, low_bit_act_clip=0.9, low_bit_weight_clip=0.8, sym=False),
}


@dataclass
class QuantConfig:
    """What to quantize and how. Defaults are the study's (REFERENCE.md): group 128, asymmetric weights,
    GPTQ damp 0.01 / block 128, AWQ grid 20 with clip search, 128 calibration windows of 2048 tokens."""

    method: str = "rtn"
    wbits: int = 4
    group_size: int | None = None  # -1 = one group per output channel; None: 128 weight-only, -1 otherwise
    sym: bool | None = None        # None: symmetric for QuaRot, asymmetric otherwise
    # weight-activation (16 = not quantized)
    abits: int = 16
    kv_bits: int = 16
    alpha: float | None = None     # smoothing strength (SmoothQuant 0.5, DuQuant 0.6)
    act_clip: float | None = None
    act_sym: bool | None = None
    weight_clip: float | None = None
    kv_group_size: int = 128
    kv_clip: float = 0.95
    weight_method: str = "gptq"    # QuaRot: gptq or rtn on the rotated model
    rotation_block: int = 128      # DuQuant
    rotation_steps: int = 256      # DuQuant
    # calibration
    calib: str = "wiki"            # wiki (offline, shipped), wikitext2, pile, or a .txt / .jsonl path
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    # GPTQ
    damp: float = 0.01
    blocksize: int = 128
    act_order: bool = False
    static_groups: bool = True     # with act_order: groups keep the natural order (the variant)
    # AWQ
    awq_grid: int = 20
    awq_duo_scaling: bool = False
    awq_clip: bool = True
    awq_max_shrink: float = 0.5
    awq_clip_tokens: int = 512
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.method = self.method.lower()
        if self.method not in METHODS:
            raise DllmqError(f"Unknown method {self.method!r}; choose one of {', '.join(METHODS)}.")
        if not 2 <= self.wbits <= 8:
            raise DllmqError(f"Weight bits must be between 2 and 8, got {self.wbits}.")
        for name in ("abits", "kv_bits"):
            if not (2 <= getattr(self, name) <= 8 or getattr(self, name) == 16):
                raise DllmqError(f"--{name.replace('_', '-')} must be between 2 and 8 (or 16 for none), "
                                 f"got {getattr(self, name)}.")
        if self.weight_activation:
            if self.abits == 16 and self.method != "rtn":
                raise DllmqError(f"{self.method} quantizes activations; give --abits (e.g. 8 or 4) or a preset "
                                 "such as W8A8 / W4A4.")
            d = _WA_DEFAULTS[self.method]
            low = self.abits <= 4
            self.alpha = d["alpha"] if self.alpha is None else self.alpha
            self.act_sym = d["act_sym"] if self.act_sym is None else self.act_sym
            self.act_clip = (d["low_bit_act_clip"] if low else 1.0) if self.act_clip is None else self.act_clip
            self.weight_clip = ((d["low_bit_weight_clip"] if self.wbits <= 4 else 1.0)
                                if self.weight_clip is None else self.weight_clip)
            self.sym = d["sym"] if self.sym is None else self.sym
            self.group_size = -1 if self.group_size is None else self.group_size
        elif self.abits != 16 or self.kv_bits != 16:
            raise DllmqError(f"{self.method} is weight-only; use smoothquant, quarot, duquant (or rtn as the "
                             "untransformed baseline) to quantize activations.")
        self.sym = bool(self.sym)
        self.group_size = 128 if self.group_size is None else self.group_size
        if self.weight_method not in ("gptq", "rtn"):
            raise DllmqError(f"--weight-method must be gptq or rtn, got {self.weight_method!r}.")
        for name in ("act_clip", "weight_clip"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise DllmqError(f"--{name.replace('_', '-')} must be in (0, 1], got {value}.")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise DllmqError(f"--alpha must be in [0, 1], got {self.alpha}.")
        if self.group_size == 0 or self.group_size < -1:
            raise DllmqError(f"Group size must be positive (or -1 for per-channel), got {self.group_size}.")
        if self.needs_calibration:
            if self.nsamples <= 0:
                raise DllmqError(f"--nsamples must be at least 1, got {self.nsamples}.")
            if self.seqlen <= 0:
                raise DllmqError(f"--seqlen must be at least 1, got {self.seqlen}.")
        if not 0 < self.damp < 1:
            raise DllmqError(f"GPTQ damping must be in (0, 1), got {self.damp}.")

    @property
    def weight_activation(self) -> bool:
        """Activations are quantized too: the three transform methods, or RTN given --abits (the baseline)."""
        return self.method in WEIGHT_ACTIVATION_METHODS or (self.method == "rtn" and self.abits < 16)

    @property
    def needs_calibration(self) -> bool:
        if self.method == "quarot":
            return self.weight_method == "gptq"
        return self.method != "rtn"

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["extra"]:
            d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Preset names expand to weight settings; methods keep their own defaults for the rest.
PRESETS = {
    "W4A16-g128": dict(wbits=4, group_size=128),
    "W3A16-g128": dict(wbits=3, group_size=128),
    "W4A16": dict(wbits=4, group_size=-1),
    "W3A16": dict(wbits=3, group_size=-1),
    "W8A8": dict(wbits=8, abits=8, group_size=-1),
    "W4A4": dict(wbits=4, abits=4, group_size=-1),
}


def preset_settings(preset: str | None) -> dict:
    """The settings a preset name stands for ({} for None)."""
    if preset is None:
        return {}
    try:
        return dict(PRESETS[preset])
    except KeyError:
        raise DllmqError(f"Unknown preset {preset!r}; known presets: {', '.join(PRESETS)}.") from None
