"""Quantization settings: one resolved config per run, the presets, and the flat form that saved
models, study configs and keyword arguments use.

    QuantConfig(method="gptq", wbits=4, group_size=128, act_order=True, nsamples=128)

Shared settings go by their flat names (SHARED below) into the weight / activation / K/V /
calibration specs; every other keyword is one of the method's own settings (its `Settings` class,
see dllmq.quant.methods). What a config leaves unset takes the method's preference (QuaRot is
symmetric, DuQuant clips at 4 bits, ...) and then the study's defaults: group 128 for
weight-only, per-channel weights for weight-activation, 128 calibration windows of 2048 tokens.
A profile (`paper`) fills what is left unset with the study code's settings instead.
"""
from __future__ import annotations

from typing import Any

from dllmq.errors import DllmqError
from dllmq.models.family import Family, Role
from dllmq.quant.dllm_calib import NONE, parse_mask_schedule, parse_weighting
from dllmq.quant.formats import FP8, INT, MXFP4, NVFP4, Format, get_format
from dllmq.quant.methods.base import EITHER, WEIGHT_ACTIVATION, Method
from dllmq.quant.registry import get_method, methods
from dllmq.quant.specs import NOT_QUANTIZED, ActSpec, CalibSpec, KVSpec, MethodSettings, WeightSpec

# The flat names of the shared settings, in the order saved configs list them.
SHARED = ("wbits", "group_size", "sym", "weight_clip", "abits", "act_sym", "act_clip", "kv_bits", "kv_group_size",
          "kv_clip", "calib", "nsamples", "seqlen", "seed")
# Settings a flat config lists after the method's own only where they differ from these defaults, so
# the configs (and study keys) of runs that do not use them read exactly as before they existed.
OPTIONAL = {"profile": "dllmq", "family": None, "keep_fp": [], "calib_windows": "random", "group_order": "execution",
            "mask_schedule": "none", "weighting": "none", "qkv_quant": False}

PROFILES = ("dllmq", "paper")   # dllmq's defaults, or the study code's (docs/fidelity.md)
DEFAULT_PROFILE = "dllmq"
# How calibration text becomes windows: `random` starts (GPTQ's reference, dllmq's default),
# `documents` (AWQ's: short documents concatenated and cut into consecutive windows) or `chat` (one
# window per prompt/response record, the prompt never masked by --mask-schedule).
CALIB_WINDOWS = ("random", "documents", "chat")   # chat: (prompt, response) records of a .jsonl (instruct models)
# The order a sequential method (GPTQ) calibrates a block's groups in: `execution` (true-sequential) or
# `down-first` (down on the full-precision gate/up outputs before gate/up are quantized: the study's
# LLaDA layer list).
GROUP_ORDERS = ("execution", "down-first")
# The number formats (dllmq.quant.formats); a config saved without them is integer.
FORMAT_KEYS = ("wformat", "aformat")


class QuantConfig:
    """What to quantize and how, resolved: `method` (its registry name), the shared specs `weight`,
    `act`, `kv` and `calibration`, the `seed` of every random choice, `settings` (the method's own),
    `profile` and `keep_fp`.

    `profile` chooses whose defaults fill what the caller leaves unset: dllmq's (`dllmq`) or the study
    code's (`paper`, per method and model `family`: each method's `paper_settings`). Settings given
    explicitly always win over the profile. A paper config made without a family resolves what does
    not depend on it; `for_family` completes it once the model is known (quantize() does).
    `keep_fp` names linears (roles such as qkv, or block linear names such as q_proj) left in full
    precision."""

    def __init__(self, method: str = "rtn", *, profile: str = DEFAULT_PROFILE, family: str | None = None,
                 **given: Any):
        cls = get_method(str(method))
        if profile not in PROFILES:
            raise DllmqError(f"Unknown profile {profile!r}; choose {' or '.join(PROFILES)}.")
        self.profile = profile
        # the family matters to (and is recorded by) the paper profile only
        self.family = None if family is None or profile != "paper" else str(family)
        self._given = dict(given)
        profiled = cls.paper_settings(self.family) if profile == "paper" else {}
        if profiled.get("qkv_quant") and (given.get("kv_bits", NOT_QUANTIZED) != NOT_QUANTIZED
                                          or given.get("aformat", INT) != INT):
            profiled.pop("qkv_quant")   # an explicit K/V or floating-point activation choice wins over the profile
        if (given.get("aformat", INT) != INT or given.get("wformat", INT) != INT or given.get("sym")
                or given.get("act_sym")):
            profiled.pop("study_grid", None)   # the study's grid is integer, asymmetric: an explicit choice wins
        self._build(cls, **{**profiled, **given})
        if self.keep_fp and family is not None:
            keep_fp_linears(_family(str(family)), self.keep_fp)   # unknown names fail now, not after loading

    def for_family(self, family: str) -> "QuantConfig":
        """This config for a model of `family`: a paper config is resolved for it (the settings given
        explicitly still win), any other config is returned as it is; keep_fp is checked against it."""
        if self.profile == "paper" and self.family != family:
            return QuantConfig(self.method, profile=self.profile, family=family, **self._given)
        if self.keep_fp:
            keep_fp_linears(_family(family), self.keep_fp)
        return self

    def keep_fp_linears(self, family: Family) -> tuple[str, ...]:
        """The block linears this config leaves in full precision on a model of `family`."""
        return keep_fp_linears(family, self.keep_fp) if self.keep_fp else ()

    def paper_note(self) -> str | None:
        """The one-line warning a paper config carries where it reproduces a quirk of the study's runs."""
        return self.method_class.paper_note(self.family) if self.profile == "paper" else None

    def _build(self, cls: type[Method], wbits: int | None = None, group_size: int | None = None,
               sym: bool | None = None, weight_clip: float | None = None, abits: int | None = None,
               act_sym: bool | None = None, act_clip: float | None = None, kv_bits: int = NOT_QUANTIZED,
               kv_group_size: int = 128, kv_clip: float = 0.95, calib: str = "wiki", nsamples: int = 128,
               seqlen: int = 2048, seed: int = 0, keep_fp: Any = (), calib_windows: str = "random",
               group_order: str = "execution", mask_schedule: Any = "none", weighting: Any = "none",
               wformat: str = INT, aformat: str = INT, qkv_quant: bool = False, **settings: Any) -> None:
        self.method_class: type[Method] = cls
        self.method = cls.name
        self.settings: MethodSettings = cls.Settings.build(cls.name, settings)
        wfmt, afmt = get_format(wformat, "--wformat"), get_format(aformat, "--aformat")
        for flag, fmt, allowed in (("--wformat", wfmt, cls.weight_formats), ("--aformat", afmt, cls.act_formats)):
            if fmt.name not in allowed:
                raise DllmqError(f"{cls.name} does not take {flag} {fmt.name}"
                                 f"{' (' + cls.format_note + ')' if cls.format_note else ''}; it takes "
                                 f"{', '.join(allowed)}.")
        cls.check_weight_format(self.settings, wfmt)
        if wfmt.is_float:
            wbits = _implied_bits("--wbits", wbits, "--wformat", wfmt)
            if group_size is not None and group_size != wfmt.group_size:
                fixed = "one scale per output channel" if wfmt.block == 0 else f"blocks of {wfmt.block} values"
                raise DllmqError(f"--wformat {wfmt.name} fixes its own scale groups ({fixed}); --group-size {group_size} "
                                 f"contradicts it, so leave --group-size out or give {wfmt.group_size}.")
            group_size, sym, weight_clip = wfmt.group_size, True, _no_clip("--weight-clip", weight_clip, wfmt)
        if afmt.is_float:
            abits = _implied_bits("--abits", abits, "--aformat", afmt)
            act_sym, act_clip = True, _no_clip("--act-clip", act_clip, afmt)
        wbits = 4 if wbits is None else wbits
        abits = NOT_QUANTIZED if abits is None else abits
        if not 2 <= wbits <= 8:
            raise DllmqError(f"Weight bits must be between 2 and 8, got {wbits}.")
        for flag, bits in (("abits", abits), ("kv-bits", kv_bits)):
            if not (2 <= bits <= 8 or bits == NOT_QUANTIZED):
                raise DllmqError(f"--{flag} must be between 2 and 8 (or 16 for none), got {bits}.")
        if cls.quantizes_activations(ActSpec(bits=abits)):
            if abits == NOT_QUANTIZED:
                raise DllmqError(f"{cls.name} quantizes activations; give --abits (e.g. 8 or 4) or a preset "
                                 "such as W8A8 / W4A4.")
            low = abits <= 4
            act_clip = (cls.low_bit_act_clip if low else 1.0) if act_clip is None else act_clip
            weight_clip = (cls.low_bit_weight_clip if wbits <= 4 else 1.0) if weight_clip is None else weight_clip
            group_size = -1 if group_size is None else group_size
        elif abits != NOT_QUANTIZED or kv_bits != NOT_QUANTIZED:
            raise DllmqError(f"{cls.name} is weight-only; use {_activation_methods()} to quantize activations.")
        for flag, value in (("act-clip", act_clip), ("weight-clip", weight_clip)):
            if value is not None and not 0 < value <= 1:
                raise DllmqError(f"--{flag} must be in (0, 1], got {value}.")
        group_size = 128 if group_size is None else group_size
        if group_size == 0 or group_size < -1:
            raise DllmqError(f"Group size must be positive (or -1 for per-channel), got {group_size}.")
        self.weight = WeightSpec(wbits, group_size, bool(cls.weight_sym if sym is None else sym),
                                 1.0 if weight_clip is None else weight_clip, wfmt.name)
        self.act = ActSpec(abits, bool(cls.act_sym if act_sym is None else act_sym),
                           1.0 if act_clip is None else act_clip, afmt.name)
        self.kv = KVSpec(kv_bits, kv_group_size, kv_clip)
        if calib_windows not in CALIB_WINDOWS:
            raise DllmqError(f"calib_windows must be {' or '.join(CALIB_WINDOWS)}, got {calib_windows!r}.")
        if group_order not in GROUP_ORDERS:
            raise DllmqError(f"group_order must be {' or '.join(GROUP_ORDERS)}, got {group_order!r}.")
        mask_schedule, weighting = parse_mask_schedule(mask_schedule), parse_weighting(weighting)
        if weighting != NONE and mask_schedule == NONE:
            raise DllmqError("--weighting weighs tokens by their mask status, and clean calibration text has no masked "
                             "tokens; give --mask-schedule too (e.g. uniform).")
        self.calibration = CalibSpec(calib, nsamples, seqlen, calib_windows, group_order, mask_schedule, weighting)
        self.keep_fp = parse_keep_fp(keep_fp)
        if self.keep_fp and self.weight_activation:
            raise DllmqError(f"--keep-fp works with weight-only quantization; {cls.name} with activation bits runs "
                             "online transforms and activation quantizers on every linear, so leave --keep-fp out.")
        # Q, K and V quantized at the activation bits after RoPE (the study's SmoothQuant / DuQuant runs)
        self.qkv_quant = bool(qkv_quant)
        if self.qkv_quant and not (self.weight_activation and afmt.name == INT):
            raise DllmqError(f"qkv_quant quantizes Q, K and V at the integer activation bits; {cls.name} here has "
                             "none, so give --abits (e.g. a W4A4 preset) or leave qkv_quant out.")
        if self.qkv_quant and self.kv.enabled:
            raise DllmqError("qkv_quant already quantizes K and V at the activation bits; leave --kv-bits out.")
        self.seed = seed
        if not self.needs_calibration and mask_schedule != NONE:
            raise DllmqError(f"--mask-schedule shapes calibration text, and {cls.name} with these settings does not "
                             "calibrate; leave it out or use a method that calibrates (gptq, awq, ...).")
        if weighting != NONE and not cls.takes_token_weights(self.settings):
            raise DllmqError(f"--weighting weighs GPTQ's Hessian and AWQ's losses; {cls.name} with these settings "
                             "has neither, so leave it out (--mask-schedule still applies).")
        if self.needs_calibration:
            if nsamples <= 0:
                raise DllmqError(f"--nsamples must be at least 1, got {nsamples}.")
            if seqlen <= 0:
                raise DllmqError(f"--seqlen must be at least 1, got {seqlen}.")

    @property
    def weight_activation(self) -> bool:
        """Activations are quantized too: a weight-activation method, or RTN given --abits (the baseline)."""
        return self.method_class.quantizes_activations(self.act)

    @property
    def needs_calibration(self) -> bool:
        return self.method_class.needs_calibration(self.settings)

    def make_method(self) -> Method:
        return self.method_class(self)

    def to_dict(self) -> dict[str, Any]:
        """The flat form: the method, the shared settings by their SHARED names, then the method's own."""
        w, a, kv, cal = self.weight, self.act, self.kv, self.calibration
        shared = (w.bits, w.group_size, w.sym, w.clip, a.bits, a.sym, a.clip, kv.bits, kv.group_size, kv.clip,
                  cal.source, cal.nsamples, cal.seqlen, self.seed)
        formats = {}
        if (w.format, a.format) != (INT, INT):   # integer configs read exactly as before the formats existed
            formats = {"wformat": w.format, "aformat": a.format}
        optional = {"profile": self.profile, "family": self.family, "keep_fp": list(self.keep_fp),
                    "calib_windows": cal.windows, "group_order": cal.group_order,
                    "mask_schedule": cal.mask_schedule, "weighting": cal.weighting, "qkv_quant": self.qkv_quant}
        return {"method": self.method, **dict(zip(SHARED, shared)), **formats, **self.settings.to_dict(),
                **{k: v for k, v in optional.items() if v != OPTIONAL[k]}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        """A config from its flat form. Keys that are neither shared nor the method's are ignored, so the
        configs of older dllmq versions (which listed every method's settings) still read."""
        method = get_method(str(d.get("method", "rtn")))
        known = set(SHARED) | set(FORMAT_KEYS) | set(OPTIONAL) | set(method.Settings.names())
        given = {**method.Settings.STORED_BEFORE, **{k: v for k, v in d.items() if k in known}}
        return cls(method.name, profile=given.pop("profile", DEFAULT_PROFILE), family=given.pop("family", None),
                   **given)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QuantConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return "QuantConfig(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"


def settable_names(method: str) -> tuple[str, ...]:
    """Every flat setting a config of `method` takes (the shared ones, the number formats, the method's own,
    then the optional ones but the family, which comes from the model)."""
    return SHARED + FORMAT_KEYS + get_method(method).Settings.names() + tuple(k for k in OPTIONAL if k != "family")


def parse_keep_fp(value: Any) -> tuple[str, ...]:
    """keep_fp as a tuple of names: from "a,b", ["a", "b"] or ()."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    if not all(isinstance(v, str) for v in items):
        raise DllmqError(f"--keep-fp takes linear roles or names separated by commas, got {value!r}.")
    names = tuple(dict.fromkeys(v.strip() for v in items if v.strip()))
    return names


def keep_fp_linears(family: Family, names: tuple[str, ...]) -> tuple[str, ...]:
    """The block linears (paths relative to a block, execution order) that `names` keep in full precision.
    A name is a role (qkv, attn_out, gate_up, down; or attn_in, mlp_in, mlp_out), a block linear's path
    (self_attn.q_proj) or its last part when that is unique in the block (q_proj)."""
    roles = {r.value: r for r in Role} | {r.name.lower(): r for r in Role}
    linears = family.block_linears
    keep: set[str] = set()
    for name in names:
        key = name.strip()
        if key.lower() in roles:
            keep.update(family.group(roles[key.lower()]).linears)
            continue
        matches = [l for l in linears if l == key] or [l for l in linears if l.rsplit(".", 1)[-1] == key]
        if len(matches) != 1:
            raise DllmqError(f"--keep-fp names {key!r}, which is neither a linear role ({', '.join(r.value for r in Role)}) "
                             f"nor a linear of a {family.name} block ({', '.join(linears)}); give those, separated by "
                             "commas.")
        keep.add(matches[0])
    return tuple(l for l in linears if l in keep)


def _family(name: str) -> Family:
    from dllmq.models.registry import get_family
    return get_family(name)


def _implied_bits(bits_flag: str, bits: int | None, format_flag: str, fmt: Format) -> int:
    if bits is not None and bits != fmt.bits:
        raise DllmqError(f"{bits_flag} {bits} contradicts {format_flag} {fmt.name}, which is {fmt.bits}-bit; "
                         f"leave {bits_flag} out or give {fmt.bits}.")
    return fmt.bits


def _no_clip(flag: str, clip: float | None, fmt: Format) -> float:
    if clip is not None and clip != 1.0:
        raise DllmqError(f"{flag} applies to the int format only; {fmt.name}'s scales are fixed by the format, "
                         f"so leave {flag} out.")
    return 1.0


def merge_preset(preset: dict, given: dict) -> dict:
    """A preset's settings overridden by the given ones. A floating-point format chosen over an integer
    preset fixes its own scale groups, so the preset's group size is dropped then (its bits are kept and
    checked: `--preset W4A4 --wformat fp8` is a contradiction)."""
    merged = {**preset, **given}
    if "group_size" in preset and "group_size" not in given and \
            merged.get("wformat", INT) != preset.get("wformat", INT) and get_format(merged["wformat"]).is_float:
        del merged["group_size"]
    return merged


def _activation_methods() -> str:
    wa = [m.name for m in methods() if m.kind == WEIGHT_ACTIVATION]
    either = [m.name for m in methods() if m.kind == EITHER]
    return ", ".join(wa) + (f" (or {', '.join(either)} as the untransformed baseline)" if either else "")


# Preset names expand to weight settings; methods keep their own defaults for the rest.
PRESETS = {
    "W4A16-g128": dict(wbits=4, group_size=128),
    "W3A16-g128": dict(wbits=3, group_size=128),
    "W4A16": dict(wbits=4, group_size=-1),
    "W3A16": dict(wbits=3, group_size=-1),
    "W8A8": dict(wbits=8, abits=8, group_size=-1),
    "W4A4": dict(wbits=4, abits=4, group_size=-1),
    # floating-point formats (dllmq.quant.formats): the scale groups come with the format; the bits are
    # stated too, so swapping a format back to int (`--preset W4A4-mxfp4 --aformat int`) keeps 4-bit
    # activations instead of silently dropping them
    "W8A8-fp8": dict(wbits=8, abits=8, wformat=FP8, aformat=FP8),
    "W8A16-fp8": dict(wbits=8, wformat=FP8),
    "W4A4-mxfp4": dict(wbits=4, abits=4, wformat=MXFP4, aformat=MXFP4),
    "W4A16-mxfp4": dict(wbits=4, wformat=MXFP4),
    "W4A4-nvfp4": dict(wbits=4, abits=4, wformat=NVFP4, aformat=NVFP4),
    "W4A16-nvfp4": dict(wbits=4, wformat=NVFP4),
}


def preset_settings(preset: str | None) -> dict:
    """The settings a preset name stands for ({} for None)."""
    if preset is None:
        return {}
    try:
        return dict(PRESETS[preset])
    except KeyError:
        raise DllmqError(f"Unknown preset {preset!r}; known presets: {', '.join(PRESETS)}.") from None
