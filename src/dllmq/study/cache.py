"""The study's cache of quantized models: CACHE/<quant_key>/ is a dllmq-quantized model directory.

A directory appears under its final name only complete: the model is saved (save_quantized, itself
temp dir + rename) into a private staging folder CACHE/.staging-<host>-<pid>-<random>/, a
study.json with the quantization's provenance is added, and the whole directory is renamed to
CACHE/<quant_key> in one step. A runner killed at any moment leaves at most its staging folder,
which lookups never look at and `clean_stale` removes once its process is gone.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path

from dllmq.atomic import install_directory, newest_mtime, pid_alive, write_text_atomic

log = logging.getLogger(__name__)

META_FILE = "study.json"
_KEY = re.compile(r"^[0-9a-f]{64}$")
_STAGING = re.compile(r"^\.staging-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]+$")
FOREIGN_STAGING_MAX_AGE = 24 * 3600.0  # a staging folder of another host untouched this long is abandoned


class QuantCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"not a cache key: {key!r}")
        return self.root / key

    def lookup(self, key: str) -> Path | None:
        """The cached model directory for `key`, or None. Only complete directories ever carry the name."""
        path = self.path(key)
        return path if (path / META_FILE).is_file() and (path / "config.json").is_file() else None

    def meta(self, key: str) -> dict:
        try:
            return json.loads((self.path(key) / META_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def store(self, key: str, model, tokenizer, meta: dict) -> Path:
        """Save a quantized model as CACHE/<key>, atomically. If another runner stored the same key
        meanwhile, theirs is kept (same key, same model) and ours is dropped."""
        from dllmq.quant import save_quantized

        final = self.path(key)
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".staging-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        staging.mkdir()
        try:
            out = save_quantized(model, tokenizer, staging / key)
            write_text_atomic(out / META_FILE, json.dumps({"quant_key": key, "created": time.time(), **meta},
                                                          indent=2, sort_keys=True))
            if not install_directory(out, final, replace=False):
                if self.lookup(key) is not None:
                    log.info("quantized model %s was cached by another runner meanwhile; keeping theirs", key[:12])
                else:  # something incomplete that lookups ignore: ours takes its place
                    install_directory(out, final, replace=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return final

    def clean_stale(self) -> list[Path]:
        """Remove staging folders left by runners that died (this host: process gone; another host:
        untouched for a day). Returns what was removed."""
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        host = socket.gethostname()
        for entry in self.root.iterdir():
            m = _STAGING.match(entry.name)
            if not m or not entry.is_dir():
                continue
            if m["host"] == host:
                dead = not pid_alive(int(m["pid"]))
            else:
                dead = time.time() - newest_mtime(entry) > FOREIGN_STAGING_MAX_AGE
            if dead:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
                log.info("removed %s, left by a runner that stopped", entry)
        return removed
