"""The cells of a study grid and their keys.

A cell is one model x method x bit config x seed (full precision once per model and seed) with all
of the study's tasks. Two hashes identify it:

- `quant_key`: what decides the quantized weights - the model's identity, the full
  QuantConfig.to_dict(), the calibration text's hash, the dtype. The cache of quantized models is
  keyed by it, so a grid with other tasks or another limit reuses the same quantized models.
- `cell_key`: what decides the cell's numbers - the quant_key's contents plus the tasks (and a hash
  of the mini tasks' shipped items), the limit, the seed and the evaluation settings.

Both are sha256 of a canonical JSON (sorted keys, no spaces) with KEY_SCHEMA in it: bump KEY_SCHEMA
when a change in dllmq makes old results incomparable, and every cell is computed afresh.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from dllmq.errors import DllmqError
from dllmq.study.config import StudyConfig, config_bits_label

KEY_SCHEMA = 1


def canonical_hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def directory_identity(directory: Path, hash_weights: bool = False) -> dict:
    """A checkpoint directory's identity: config.json's hash and each weight file's size and mtime
    (hashing gigabytes of weights on every run would cost minutes), or with `hash_weights` each weight
    file's SHA-256 (the shipped models: megabytes, and a fresh clone gives every file a new mtime)."""
    config = directory / "config.json"
    if not config.is_file():
        raise DllmqError(f"{directory} has no config.json; give a checkpoint directory.")
    weights = sorted(p for p in directory.iterdir()
                     if p.is_file() and (p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json")))
    stamp = (lambda p: _file_sha256(p)) if hash_weights else (lambda p: p.stat().st_mtime_ns)
    return {"config_sha256": _file_sha256(config),
            "weights": [[p.name, p.stat().st_size, stamp(p)] for p in weights]}


def model_identity(name: str) -> str:
    """Canonical JSON naming exactly which weights `name` stands for (raises DllmqError when it cannot
    be read). Built-in random models: their config (they are built with seed 0); directories:
    directory_identity; the shipped dllmq-tiny models: their files' contents; Hub ids: the id alone."""
    from dllmq.models.loading import _HUB_ID, resolve_model_dir
    from dllmq.models.random_models import RANDOM_MODELS, random_config
    from dllmq.tiny import NAMES, checkpoint_dir, not_shipped

    path = Path(name).expanduser()
    if not path.exists() and not_shipped(name):
        raise DllmqError(f"{not_shipped(name)}.")
    if path.is_dir():
        ident = directory_identity(path)
    elif name in RANDOM_MODELS:
        ident = {"random": name, "model_seed": 0, "config_sha256": canonical_hash(random_config(name))}
    elif name in NAMES:
        ident = {"builtin": name, **directory_identity(checkpoint_dir(name), hash_weights=True)}
    elif path.exists() or not _HUB_ID.match(name):
        resolve_model_dir(name)  # raises the loader's own sentence (a file, or no such directory)
        raise DllmqError(f"{name} is not a model; give a built-in name, a checkpoint directory or a Hub id.")
    else:  # the Hub id alone: resolving it here could start a download
        ident = {"hub": name}
    return json.dumps({"name": name, **ident}, sort_keys=True)


def model_family(name: str) -> str | None:
    """The family of `name` from its config alone (None where it cannot be read without a download)."""
    from dllmq.models.config import read_config_json
    from dllmq.models.random_models import RANDOM_MODELS, random_config
    from dllmq.models.registry import parse_model_config
    from dllmq.tiny import NAMES, checkpoint_dir
    try:
        path = Path(name).expanduser()
        if path.is_dir():
            raw = read_config_json(path)
        elif name in RANDOM_MODELS:
            raw = random_config(name)
        elif name in NAMES:
            raw = read_config_json(checkpoint_dir(name))
        else:
            return None
        return parse_model_config(raw).family
    except (DllmqError, OSError, ValueError):
        return None


@functools.lru_cache(maxsize=1)
def _wiki_sha256() -> str:
    return hashlib.sha256(resources.files("dllmq.data").joinpath("wiki", "enwiki_train.txt.gz").read_bytes()).hexdigest()


def calibration_identity(calib: str) -> dict:
    """The calibration text's identity: the shipped wiki file's hash, a local file's hash, or a dataset name."""
    if calib == "wiki":
        return {"wiki_sha256": _wiki_sha256()}
    if calib in ("wikitext2", "pile"):
        return {"dataset": calib}
    path = Path(calib).expanduser()
    if not path.is_file():
        raise DllmqError(f"The calibration file {calib} does not exist; give wiki, wikitext2, pile or a .txt/.jsonl file.")
    return {"file": str(path.resolve()), "sha256": _file_sha256(path)}


@functools.lru_cache(maxsize=16)
def task_data_identity(task: str) -> str | None:
    """A hash of a mini task's shipped items (None for harness tasks, whose data the harness versions)."""
    from dllmq.evaluate.mini import TASKS
    if task not in TASKS:
        return None
    data = resources.files("dllmq.evaluate").joinpath("mini_data", f"{task}.jsonl").read_bytes()
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class StudyCell:
    model: str
    method: str          # the DB label (the method entry's label, usually its name)
    method_name: str     # fp | rtn | gptq | ...
    preset: str          # FP or the preset name (W4A16-g128)
    seed: int
    settings: dict       # QuantConfig.to_dict() ({} for fp)
    tasks: tuple[str, ...]
    limit: int | None
    dtype: str           # resolved: float32 / bfloat16 / float16
    eval_key: dict
    quant_key: str | None  # None for fp
    cell_key: str

    @property
    def bits(self) -> str:
        return "FP" if self.preset == "FP" else config_bits_label(self.preset, self.quant_config())

    @property
    def is_fp(self) -> bool:
        return self.method_name == "fp"

    def quant_config(self):
        from dllmq.quant import QuantConfig
        return None if self.is_fp else QuantConfig.from_dict(self.settings)

    def describe(self) -> str:
        seed = f" seed {self.seed}" if self.seed else ""
        return f"{self.model} {self.method} {self.bits}{seed}"


def _resolved_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "float32" if str(device).split(":")[0] == "cpu" else "bfloat16"


def quant_key(model_ident: str, settings: dict, dtype: str, calib_threads: int | None = None) -> str:
    """calib_threads: the thread count pinned while quantizing (None: not pinned, the key of before)."""
    from dllmq.quant import QuantConfig
    calib = calibration_identity(settings["calib"]) if QuantConfig.from_dict(settings).needs_calibration else None
    extra = {} if calib_threads is None or calib is None else {"calib_threads": calib_threads}
    return canonical_hash({"kind": "quant", "schema": KEY_SCHEMA, "model": json.loads(model_ident),
                           "quant": settings, "calibration": calib, "dtype": dtype, **extra})


def cell_key(model_ident: str, method: str, bits: str, settings: dict, qkey: str | None, tasks: tuple[str, ...],
             limit: int | None, seed: int, eval_key: dict, dtype: str) -> str:
    return canonical_hash({"kind": "cell", "schema": KEY_SCHEMA, "model": json.loads(model_ident), "method": method,
                           "bits": bits, "quant": settings, "quant_key": qkey,
                           "tasks": [[t, task_data_identity(t)] for t in tasks], "limit": limit, "seed": seed,
                           "eval": eval_key, "dtype": dtype})


def plan_cells(config: StudyConfig, device: str = "cpu",
               model_identities: dict[str, str] | None = None) -> list[StudyCell]:
    """Every cell of the grid, in run order: per model, per seed, the methods in config order.

    model_identities: precomputed model_identity values (the dry run passes placeholders for models
    it cannot read); by default each model's identity is read now (DllmqError if it cannot be)."""
    dtype = _resolved_dtype(config.dtype, device)
    eval_key = config.eval.key_dict()
    if config.measures is not None:  # the measures decide numbers of the cell too
        eval_key = {**eval_key, "measures": config.measures.key_dict()}
    cells: list[StudyCell] = []
    for model in config.models:
        ident = (model_identities or {}).get(model) or model_identity(model)
        family = model_family(model)
        for seed in config.seeds:
            for spec in config.methods:
                for preset in spec.bits:
                    qc = spec.quant_config(preset, config.calibration, seed)
                    if qc is not None and family is not None:
                        qc = qc.for_family(family)   # a paper entry resolves per model family
                    settings = qc.to_dict() if qc is not None else {}
                    qkey = quant_key(ident, settings, dtype, config.calibration.threads) if qc is not None else None
                    label = "FP" if qc is None else config_bits_label(preset, qc)
                    key = cell_key(ident, spec.label, label, settings, qkey, config.tasks, config.limit, seed,
                                   eval_key, dtype)
                    cells.append(StudyCell(model=model, method=spec.label, method_name=spec.name, preset=preset,
                                      seed=seed, settings=settings, tasks=config.tasks, limit=config.limit,
                                      dtype=dtype, eval_key=eval_key, quant_key=qkey, cell_key=key))
    return cells


def model_is_readable(name: str) -> str | None:
    """None when `name`'s identity can be read, else the reason (one sentence)."""
    try:
        model_identity(name)
    except DllmqError as err:
        return str(err)
    except OSError as err:
        return f"{name} cannot be read ({err})."
    return None


__all__ = ["KEY_SCHEMA", "StudyCell", "canonical_hash", "cell_key", "model_identity", "model_is_readable", "plan_cells",
           "quant_key"]
