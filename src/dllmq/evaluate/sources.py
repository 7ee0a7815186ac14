"""Where the harness's datasets come from: a folder of downloaded datasets first, then HF datasets
(network or cache); when neither has one, one DatasetUnavailable that says how to supply it.

Layouts read from DATA_DIR, for a dataset PATH (e.g. openai/gsm8k, also spelled openai__gsm8k) and
config NAME:
    DATA_DIR/PATH[/NAME]/{split}.jsonl|.json|.parquet|.csv   (or {split}-*.parquet, {split}/*.parquet)
    DATA_DIR/PATH[/NAME]/ written by DatasetDict.save_to_disk
    DATA_DIR/PATH/ a snapshot of the Hub dataset repo
      (huggingface-cli download --repo-type dataset PATH --local-dir DATA_DIR/PATH)
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import datasets
import huggingface_hub.constants as hub_constants

from dllmq.errors import DllmqError

log = logging.getLogger(__name__)

SPLIT_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_BUILDER = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "imagefolder", "audiofolder"}


class DatasetUnavailable(DllmqError):
    """A task's dataset is neither in --data-dir nor reachable through HF datasets."""

    def __init__(self, path: str, name: str | None, reason: str, data_dir: str | None):
        self.path, self.name, self.reason, self.data_dir = path, name, reason, data_dir
        super().__init__(self._message())

    def _message(self, task: str | None = None) -> str:
        ds = self.path + (f" (config {self.name})" if self.name else "")
        looked = f", nor in --data-dir {self.data_dir}" if self.data_dir else ""
        files = f"DATA_DIR/{self.path}" + (f"/{self.name}" if self.name else "") + "/test.jsonl"
        return (f"The dataset {ds}{f' for task {task}' if task else ''} is not reachable through HF datasets or its "
                f"cache{looked} ({self.reason}); download it where there is network "
                f"(huggingface-cli download --repo-type dataset {self.path} --local-dir DATA_DIR/{self.path}, "
                f"or save its splits as {files}) and pass --data-dir DATA_DIR, or point HF_DATASETS_CACHE at a "
                "cache that has it.")

    def for_task(self, task: str) -> DatasetUnavailable:
        err = DatasetUnavailable(self.path, self.name, self.reason, self.data_dir)
        err.args = (err._message(task),)
        return err


def _split_files(folder: Path) -> dict[str, list[str]] | None:
    """{split: [files]} for split files in `folder` (one builder type), or None."""
    if not folder.is_dir():
        return None
    found: dict[str, list[str]] = {}
    kinds = set()
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix in SPLIT_SUFFIXES:
            split = f.name[: -len(f.suffix)].split("-")[0]
            found.setdefault(split, []).append(str(f))
            kinds.add(_BUILDER[f.suffix])
        elif f.is_dir() and any(g.suffix == ".parquet" for g in f.iterdir()):
            found.setdefault(f.name, []).extend(str(g) for g in sorted(f.iterdir()) if g.suffix == ".parquet")
            kinds.add("parquet")
    if not found or len(kinds) != 1:
        return None
    return {"__builder__": [kinds.pop()], **found}


def local_dataset(data_dir: str | os.PathLike, path: str, name: str | None, original_load, **kwargs):
    """The dataset `path` / `name` from `data_dir` in one of the documented layouts, or None."""
    root = Path(data_dir)
    for base in (root / path, root / path.replace("/", "__")):
        candidates = [base / name, base] if name else [base]
        for folder in candidates:
            files = _split_files(folder)
            if files:
                builder = files.pop("__builder__")[0]
                log.info("dataset %s%s from %s", path, f":{name}" if name else "", folder)
                return original_load(builder, data_files=files)
            if (folder / "dataset_dict.json").is_file() or (folder / "dataset_info.json").is_file() and \
                    (folder / "state.json").is_file():
                log.info("dataset %s%s from %s (save_to_disk)", path, f":{name}" if name else "", folder)
                return datasets.load_from_disk(str(folder))
        if base.is_dir():
            log.info("dataset %s%s from the repository snapshot %s", path, f":{name}" if name else "", base)
            keep = {k: v for k, v in kwargs.items() if k in ("split", "revision", "data_files")}
            return original_load(str(base), name=name, **keep)
    return None


@contextlib.contextmanager
def dataset_sources(data_dir: str | os.PathLike | None = None, offline: bool | None = None) -> Iterator[None]:
    """Within the block, `datasets.load_dataset` (as the harness calls it) reads `data_dir` first,
    then HF datasets; any failure becomes one DatasetUnavailable. offline=True stops HF datasets
    from trying the network (no retries), as HF_DATASETS_OFFLINE=1 would."""
    original = datasets.load_dataset
    data_dir = str(data_dir) if data_dir else None
    if data_dir and not Path(data_dir).is_dir():
        raise DllmqError(f"--data-dir {data_dir} is not a directory; give the folder that holds the datasets.")

    def load(path: str | None = None, name: str | None = None, *args, **kwargs):
        if path is None or path in _LOCAL_BUILDERS or Path(str(path)).exists():
            return original(path, name, *args, **kwargs)
        if data_dir:
            found = local_dataset(data_dir, str(path), name, original, **kwargs)
            if found is not None:
                return found
        try:
            return original(path, name, *args, **kwargs)
        except DllmqError:
            raise
        except Exception as err:  # datasets / hub raise many types; the user needs one sentence
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}".rstrip(": ")
            raise DatasetUnavailable(str(path), name, reason, data_dir) from None

    patches = [(datasets, "load_dataset", load)]
    if offline:
        patches += [(datasets.config, "HF_HUB_OFFLINE", True), (hub_constants, "HF_HUB_OFFLINE", True)]
        if hasattr(datasets.config, "HF_DATASETS_OFFLINE"):
            patches.append((datasets.config, "HF_DATASETS_OFFLINE", True))
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    try:
        for obj, attr, value in patches:
            setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)
