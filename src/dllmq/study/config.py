"""The study config: which models, methods x bit configs, tasks, limit, calibration and seeds make the grid.

A YAML file (see default_study.yaml, the paper's grid, which is also what `dllmq study` runs with no
--config):

    models: [random-llada, path/to/checkpoint]
    methods:
      - fp                                   # full precision, once per model
      - {name: rtn, bits: [W4A16-g128, W3A16-g128]}
      - {name: gptq, bits: [W4A16-g128], act_order: true, label: gptq-ao}   # any setting of the method
      - {name: quarot, bits: [W4A4], weight_method: rtn}
    tasks: [mini_general, mini_math, mini_code]   # mini tasks, or lm-evaluation-harness tasks / groups
    limit: 100                               # items per task (null = all)
    calibration: {calib: wiki, nsamples: 32, seqlen: 256}
    seeds: [0]
    dtype: auto
    eval: {chat: null, batch_size: 32, allow_code_execution: false, data_dir: null, harness: {}}
    measures: {text: wiki, windows: 16, seqlen: 128, ratios: [0.1, 0.25, 0.5, 0.75, 1.0], elbo_mc: 2,
               trajectory: 8, outliers: 0}    # distribution measures vs FP; null turns them off; outliers:
                                             # the FP cell's massive-activation profile on that many windows
    threads: null                            # torch threads while evaluating (null: the process's own)
    profile: dllmq                           # or paper: the study code's settings for quantization (a method entry
                                             # may set its own) and for the harness tasks of every cell

Every problem is reported as one DllmqError sentence that names the key, e.g.
"Study config study.yaml: methods[2].bits has an unknown bit config 'W5A16'; use one of ...".
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from dllmq.errors import DllmqError
from dllmq.quant.config import PRESETS, PROFILES, QuantConfig, merge_preset, settable_names
from dllmq.quant.registry import get_method, method_names

DEFAULT_CONFIG_NAME = "default_study.yaml"
# Grids shipped with dllmq, by the name `dllmq study --config NAME` accepts (a file of that name wins).
SHIPPED_CONFIGS = {"default": DEFAULT_CONFIG_NAME, "dllm-aware": "dllm_aware.yaml", "families": "families.yaml"}
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Settings a method entry may not override: the method is the entry's name, the seed comes from `seeds`.
_RESERVED = ("method", "seed")
_TOP_KEYS = ("models", "methods", "tasks", "limit", "calibration", "seeds", "dtype", "eval", "measures", "threads",
             "profile")
_CALIB_KEYS = ("calib", "nsamples", "seqlen", "threads")
_MEASURE_KEYS = ("text", "windows", "seqlen", "ratios", "elbo_mc", "trajectory", "batch_size", "outliers")
_EVAL_KEYS = ("chat", "batch_size", "allow_code_execution", "data_dir", "offline", "harness")


def bits_label(preset: str) -> str:
    """The DB label of a bit config: the preset name without its group suffix (W4A16-g128 -> W4A16)."""
    return re.sub(r"-g\d+$", "", preset)


def format_suffix(config: QuantConfig) -> str:
    """The number formats of a config as a label suffix: "" for integers, fp8 / mxfp4 / nvfp4 when weights and
    quantized activations share it, else weights-activations (nvfp4-fp8, int-fp8)."""
    w = config.weight.format
    a = config.act.format if config.weight_activation else w
    if (w, a) == ("int", "int"):
        return ""
    return w if a == w else f"{w}-{a}"


def config_bits_label(preset: str, config: QuantConfig | None) -> str:
    """The DB label of a cell: the preset's label, with the number formats appended when the method entry's
    settings choose floating-point formats the preset name does not say (W8A8 + wformat/aformat fp8 ->
    W8A8-fp8), so such rows never collide with the integer ones."""
    label = bits_label(preset)
    if config is None:
        return label
    suffix = format_suffix(config)
    base, _, named = label.partition("-")
    if not suffix or named == suffix:
        return label
    return f"{base}-{suffix}"


@dataclass(frozen=True)
class Calibration:
    calib: str = "wiki"
    nsamples: int = 32
    seqlen: int = 256
    # torch threads pinned while a cell quantizes: float reductions (GPTQ's Hessian products) may
    # depend on the thread count, so a fixed count keeps the quantized weights the same on every run
    # and machine; part of the quantized model's cache key.
    threads: int = 1


@dataclass(frozen=True)
class MeasureSettings:
    """The distribution measures of every cell against its model's FP (dllmq.diffusion.divergence):
    masked-prediction KL and top-1 agreement at `ratios`, the ELBO with `elbo_mc` draws per window, on
    `windows` windows of `seqlen` tokens of `text`'s held-out split; and the generation trajectory of
    the first `trajectory` items of each mini generation task, teacher-forced on FP's (0: off)."""
    text: str = "wiki"
    windows: int = 16
    seqlen: int = 128
    ratios: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 1.0)
    elbo_mc: int = 2
    trajectory: int = 8
    batch_size: int = 16   # rows per forward pass (the values do not depend on it)
    outliers: int = 0      # the FP cell profiles massive activations on this many of the windows (0: off)

    def key_dict(self) -> dict:
        """What decides the measures' values (the masks are seeded by the cell's seed)."""
        key = {"text": self.text, "windows": self.windows, "seqlen": self.seqlen, "ratios": list(self.ratios),
               "elbo_mc": self.elbo_mc, "trajectory": self.trajectory}
        return {**key, "outliers": self.outliers} if self.outliers else key   # older keys unchanged


@dataclass(frozen=True)
class EvalSettings:
    """How tasks are run. Everything but data_dir / offline / allow_code_execution is part of a cell's key."""
    chat: bool | None = None          # None: the chat template for chat models (dllmq-tiny-instruct)
    batch_size: int = 32              # prompts generated together (mini tasks)
    allow_code_execution: bool = False  # harness humaneval / mbpp (mini_code is its own opt-in)
    data_dir: str | None = None       # harness datasets downloaded elsewhere
    offline: bool = False             # harness: never try the network for datasets
    harness: dict = field(default_factory=dict)  # harness overrides (mc_num, gen_length, ...)
    profile: str = "dllmq"            # the grid's profile: paper runs harness tasks as the study's code did

    def key_dict(self) -> dict:
        key = {"chat": self.chat, "batch_size": self.batch_size, "harness": dict(sorted(self.harness.items()))}
        return key if self.profile == "dllmq" else {**key, "profile": self.profile}   # older keys unchanged


@dataclass(frozen=True)
class MethodSpec:
    """One entry of `methods`: a method, its bit configs (preset names) and setting overrides."""
    name: str
    bits: tuple[str, ...]
    overrides: dict = field(default_factory=dict)
    label: str = ""                   # the DB's method column; defaults to the name

    def quant_config(self, preset: str, calibration: Calibration, seed: int) -> QuantConfig | None:
        """The full QuantConfig of one bit config (None for fp): calibration, then preset, then overrides."""
        if self.name == "fp":
            return None
        settings: dict[str, Any] = {"calib": calibration.calib, "nsamples": calibration.nsamples,
                                    "seqlen": calibration.seqlen}
        profile = self.overrides.get("profile", "dllmq")
        if profile == "paper":  # the study's own calibration windows win over the grid's calibration block
            for k in get_method(self.name).paper_settings(None):
                settings.pop(k, None)
        settings.update(merge_preset(PRESETS[preset], self.overrides))
        return QuantConfig(method=self.name, seed=seed, **settings)

    def bits_label(self, preset: str, calibration: "Calibration | None" = None) -> str:
        """The DB label of one of this entry's bit configs (the formats its settings choose included)."""
        if self.name == "fp":
            return bits_label(preset)
        return config_bits_label(preset, self.quant_config(preset, calibration or Calibration(), 0))


@dataclass(frozen=True)
class StudyConfig:
    models: tuple[str, ...]
    methods: tuple[MethodSpec, ...]
    tasks: tuple[str, ...]
    limit: int | None = 100
    calibration: Calibration = Calibration()
    seeds: tuple[int, ...] = (0,)
    dtype: str = "auto"
    eval: EvalSettings = EvalSettings()
    source: str = "<config>"          # where it came from, for messages
    measures: MeasureSettings | None = MeasureSettings()   # None: accuracy only
    threads: int | None = None        # torch threads while evaluating; None: the process's own. Results do
                                      # not depend on it (tests/study/test_measures.py checks), so it is
                                      # recorded in the cells table, not part of a cell's key

    def with_threads(self, threads: int | None) -> "StudyConfig":
        from dataclasses import replace
        if threads is not None and (not _is_int(threads) or threads < 1):
            raise DllmqError(f"threads must be a positive whole number, got {threads!r}.")
        return replace(self, threads=threads)

    def with_limit(self, limit: int | None) -> "StudyConfig":
        from dataclasses import replace
        return replace(self, limit=_limit(limit, f"Study config {self.source}"))


# ----------------------------------------------------------------------------------- parsing
def _err(src: str, key: str, problem: str) -> DllmqError:
    return DllmqError(f"Study config {src}: {key} {problem}.")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _limit(value: Any, src: str) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise DllmqError(f"{src}: limit must be a positive whole number of items per task (or null for all), "
                         f"got {value!r}.")
    return value


def _str_list(src: str, key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, (str, int, float)) for v in value):
        raise _err(src, key, "must be a non-empty list of names")
    return tuple(str(v) for v in value)


def _mapping(src: str, key: str, value: Any, allowed: tuple[str, ...]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _err(src, key, f"must be a mapping with keys among {', '.join(allowed)}")
    for k in value:
        if k not in allowed:
            raise _err(src, f"{key}.{k}", f"is not a known setting; use {', '.join(allowed)}")
    return value


def _expand_tasks(src: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """Mini names (and `mini`) stay mini tasks; anything else goes through the harness presets' groups."""
    from dllmq.evaluate.mini import ALIASES, TASKS
    from dllmq.evaluate.presets import resolve_tasks

    out: list[str] = []
    for name in names:
        name = name.strip()
        if not name:
            raise _err(src, "tasks", "has an empty task name")
        expanded = ALIASES.get(name) or ((name,) if name in TASKS else tuple(resolve_tasks([name])))
        out += [t for t in expanded if t not in out]
    return tuple(out)


def _method(src: str, i: int, entry: Any, calibration: Calibration, profile: str = "dllmq") -> MethodSpec:
    where = f"methods[{i}]"
    if isinstance(entry, str):
        entry = {"name": entry}
    if isinstance(entry, dict) and profile != "dllmq" and "profile" not in entry and str(entry.get("name")) != "fp":
        entry = {**entry, "profile": profile}   # the grid's profile, unless the entry sets its own
    if not isinstance(entry, dict) or "name" not in entry:
        raise _err(src, where, "must be a mapping with a name (e.g. {name: rtn, bits: [W4A16-g128]}) or the word fp")
    name = str(entry["name"]).lower()
    known = ("fp", *method_names())
    if name not in known:
        raise _err(src, f"{where}.name", f"is {entry['name']!r}, not a known method; use {', '.join(known)}")
    label = entry.get("label", name)
    if not isinstance(label, str) or not label.strip():
        raise _err(src, f"{where}.label", "must be a non-empty name")
    overrides = {k: v for k, v in entry.items() if k not in ("name", "bits", "label")}
    allowed = () if name == "fp" else tuple(k for k in settable_names(name) if k not in _RESERVED)
    for k in overrides:
        if k not in allowed and name != "fp":
            hint = "comes from the entry's name" if k == "method" else (
                "comes from seeds" if k == "seed" else f"is not a setting of {name}; use {', '.join(allowed)}")
            raise _err(src, f"{where}.{k}", hint)
    if name == "fp":
        bits = entry.get("bits", ["FP"])
        if overrides or _str_list(src, f"{where}.bits", bits) != ("FP",):
            raise _err(src, where, "is fp, which takes no bits or settings")
        return MethodSpec("fp", ("FP",), {}, label)
    if "bits" not in entry:
        raise _err(src, f"{where}.bits", f"is missing; list bit configs such as {', '.join(PRESETS)}")
    bits = _str_list(src, f"{where}.bits", entry["bits"])
    for b in bits:
        if b not in PRESETS:
            raise _err(src, f"{where}.bits", f"has an unknown bit config {b!r}; use one of {', '.join(PRESETS)}")
    if len(set(bits)) != len(bits):
        raise _err(src, f"{where}.bits", "lists a bit config twice")
    spec = MethodSpec(name, bits, dict(overrides), label)
    for b in bits:  # every combination must be a valid QuantConfig now, not hours into the run
        try:
            spec.quant_config(b, calibration, 0)
        except DllmqError as err:
            raise _err(src, f"{where} at {b}", f"is not a valid setting ({str(err).rstrip('.')})") from None
        except TypeError as err:
            raise _err(src, where, f"has a setting of the wrong type ({err})") from None
    return spec


def parse_study_config(data: Any, source: str = "<config>") -> StudyConfig:
    """A validated StudyConfig from the parsed YAML mapping; DllmqError names the first bad key."""
    src = source
    if not isinstance(data, dict):
        raise DllmqError(f"Study config {src} must be a YAML mapping with keys {', '.join(_TOP_KEYS)}.")
    for k in data:
        if k not in _TOP_KEYS:
            raise _err(src, str(k), f"is not a known key; use {', '.join(_TOP_KEYS)}")
    for k in ("models", "methods", "tasks"):
        if k not in data:
            raise _err(src, k, "is missing")
    models = _str_list(src, "models", data["models"])

    raw_cal = _mapping(src, "calibration", data.get("calibration"), _CALIB_KEYS)
    calibration = Calibration(**raw_cal)
    if not isinstance(calibration.calib, str) or not calibration.calib:
        raise _err(src, "calibration.calib", "must be wiki, wikitext2, pile or a path to a .txt/.jsonl file")
    for k in ("nsamples", "seqlen", "threads"):
        if not _is_int(getattr(calibration, k)) or getattr(calibration, k) < 1:
            raise _err(src, f"calibration.{k}", f"must be a positive whole number, got {getattr(calibration, k)!r}")

    if not isinstance(data["methods"], list) or not data["methods"]:
        raise _err(src, "methods", "must be a non-empty list of methods")
    profile = data.get("profile", "dllmq")
    if profile not in PROFILES:
        raise _err(src, "profile", f"is {profile!r}; use {' or '.join(PROFILES)}")
    methods = tuple(_method(src, i, e, calibration, profile) for i, e in enumerate(data["methods"]))
    seen: dict[tuple[str, str], int] = {}
    for i, m in enumerate(methods):
        for b in m.bits:
            key = (m.label, m.bits_label(b, calibration))
            if key in seen:
                raise _err(src, f"methods[{i}]", f"repeats {m.label} at {key[1]} (also in methods[{seen[key]}]); "
                                                 "give one of them a distinct label")
            seen[key] = i

    tasks = _expand_tasks(src, _str_list(src, "tasks", data["tasks"]))
    limit = _limit(data.get("limit", 100), f"Study config {src}")
    seeds_raw = data.get("seeds", [0])
    seeds_raw = [seeds_raw] if _is_int(seeds_raw) else seeds_raw
    if not isinstance(seeds_raw, list) or not seeds_raw or not all(_is_int(s) and s >= 0 for s in seeds_raw) \
            or len(set(seeds_raw)) != len(seeds_raw):
        raise _err(src, "seeds", f"must be a list of distinct non-negative whole numbers, got {data.get('seeds')!r}")
    dtype = data.get("dtype", "auto")
    if dtype not in DTYPES:
        raise _err(src, "dtype", f"is {dtype!r}; use {', '.join(DTYPES)}")

    _refuse_kv_cache(src, data.get("eval"))
    raw_eval = dict(_mapping(src, "eval", data.get("eval"), _EVAL_KEYS))
    harness = _mapping(src, "eval.harness", raw_eval.pop("harness", None), _harness_keys())
    ev = EvalSettings(**raw_eval, harness=dict(harness), profile=profile)
    if ev.chat is not None and not isinstance(ev.chat, bool):
        raise _err(src, "eval.chat", "must be true, false or null (automatic)")
    if not _is_int(ev.batch_size) or ev.batch_size < 1:
        raise _err(src, "eval.batch_size", f"must be a positive whole number, got {ev.batch_size!r}")
    for k in ("allow_code_execution", "offline"):
        if not isinstance(getattr(ev, k), bool):
            raise _err(src, f"eval.{k}", "must be true or false")
    if ev.data_dir is not None and not isinstance(ev.data_dir, str):
        raise _err(src, "eval.data_dir", "must be a folder path or null")
    _check_code_tasks(src, tasks, ev)
    measures = _measures(src, data["measures"]) if "measures" in data else MeasureSettings()
    threads = data.get("threads")
    if threads is not None and (not _is_int(threads) or threads < 1):
        raise _err(src, "threads", f"must be a positive whole number or null, got {threads!r}")
    return StudyConfig(models=models, methods=methods, tasks=tasks, limit=limit, calibration=calibration,
                       seeds=tuple(seeds_raw), dtype=dtype, eval=ev, source=src, measures=measures, threads=threads)


def _measures(src: str, value: Any) -> MeasureSettings | None:
    if value is None or value is False:
        return None
    raw = dict(_mapping(src, "measures", value, _MEASURE_KEYS))
    if "ratios" in raw:
        r = raw["ratios"]
        if not isinstance(r, list) or not r or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                      and 0 < x <= 1 for x in r) or len(set(r)) != len(r):
            raise _err(src, "measures.ratios", f"must be a list of distinct mask ratios in (0, 1], got {r!r}")
        raw["ratios"] = tuple(float(x) for x in r)
    m = MeasureSettings(**raw)
    if not isinstance(m.text, str) or not m.text:
        raise _err(src, "measures.text", "must be wiki, wikitext2, pile or a path to a .txt/.jsonl file")
    for k, least in (("windows", 1), ("seqlen", 8), ("elbo_mc", 0), ("trajectory", 0), ("batch_size", 1),
                     ("outliers", 0)):
        v = getattr(m, k)
        if not _is_int(v) or v < least:
            raise _err(src, f"measures.{k}", f"must be a whole number >= {least}, got {v!r}")
    return m


def _refuse_kv_cache(src: str, ev: Any) -> None:
    """The study's numbers are exact decoding; the approximate KV cache is an opt-in of generate / eval only."""
    harness = ev.get("harness") if isinstance(ev, dict) else None
    for key, mapping in (("eval", ev), ("eval.harness", harness)):
        if isinstance(mapping, dict) and "kv_cache" in mapping:
            raise _err(src, f"{key}.kv_cache", "is refused: the study always decodes exactly (the approximate KV "
                                               "cache is for dllmq generate / eval only)")


def _harness_keys() -> tuple[str, ...]:
    from dllmq.evaluate.presets import OVERRIDABLE
    return OVERRIDABLE


def _check_code_tasks(src: str, tasks: tuple[str, ...], ev: EvalSettings) -> None:
    from dllmq.evaluate.mini import TASKS
    from dllmq.evaluate.presets import preset_for

    code = [t for t in tasks if t not in TASKS and preset_for(t).code_execution]
    if code and not ev.allow_code_execution:
        raise _err(src, "tasks", f"include {', '.join(code)}, which run model-written code; set "
                                 "eval.allow_code_execution: true to run it in dllmq's sandbox, or leave them out")


def shipped_config_name(name: str) -> str | None:
    """The file of a shipped grid named `name` (families, dllm-aware, default; _ for - accepted), else None."""
    return SHIPPED_CONFIGS.get(str(name).strip().lower().replace("_", "-"))


def load_config(path: str | Path | None = None) -> StudyConfig:
    """The study config at `path`, a shipped grid by name (SHIPPED_CONFIGS: `families`, ...), or the paper's
    grid shipped as default_study.yaml when None."""
    import yaml

    shipped = None if path is None or Path(path).expanduser().is_file() else shipped_config_name(str(path))
    if path is None or shipped:
        source = shipped or DEFAULT_CONFIG_NAME
        text = resources.files("dllmq.study").joinpath(source).read_text(encoding="utf-8")
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DllmqError(f"No study config at {p}; give a YAML file (see dllmq/study/{DEFAULT_CONFIG_NAME}) or "
                             f"the name of a shipped grid ({', '.join(SHIPPED_CONFIGS)}).")
        text, source = p.read_text(encoding="utf-8"), str(p)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid syntax"
        raise DllmqError(f"Study config {source} is not valid YAML{where} ({problem}); fix the file and run again.") \
            from None
    return parse_study_config(data, source)


def default_config() -> StudyConfig:
    """The paper's grid on dllmq-tiny and dllmq-tiny-instruct (default_study.yaml)."""
    return load_config(None)
