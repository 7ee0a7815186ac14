"""Quantization settings: one dataclass with the reference implementations' defaults, and the presets."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from dllmq.errors import DllmqError

WEIGHT_ONLY_METHODS = ("rtn", "gptq", "awq")


@dataclass
class QuantConfig:
    """What to quantize and how. Defaults are the study's (REFERENCE.md): group 128, asymmetric weights,
    GPTQ damp 0.01 / block 128, AWQ grid 20 with clip search, 128 calibration windows of 2048 tokens."""

    method: str = "rtn"
    wbits: int = 4
    group_size: int = 128          # -1 = one group per output channel
    sym: bool = False
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
        if self.method not in WEIGHT_ONLY_METHODS:
            raise DllmqError(f"Unknown method {self.method!r}; choose one of {', '.join(WEIGHT_ONLY_METHODS)}.")
        if not 2 <= self.wbits <= 8:
            raise DllmqError(f"Weight bits must be between 2 and 8, got {self.wbits}.")
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
    def needs_calibration(self) -> bool:
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
}


def apply_preset(config: QuantConfig, preset: str | None) -> QuantConfig:
    if preset is None:
        return config
    try:
        return replace(config, **PRESETS[preset])
    except KeyError:
        raise DllmqError(f"Unknown preset {preset!r}; known presets: {', '.join(PRESETS)}.") from None
