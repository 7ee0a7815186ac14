"""Atomic writes and shareable permissions: nothing half-written ever carries a final name.

Files are written to a temp file in the same folder, flushed to disk (fsync), given the mode a
plainly created file would have, and renamed over the target in one step. On any error, or Ctrl-C,
the temp file is removed and the old file is untouched.

    write_json_atomic("results.json", report)
    with atomic_open("notes.txt") as f:
        f.write(text)
    with atomic_path("checkpoint.pt") as tmp:     # for writers that want a file name
        torch.save(state, tmp)

Directories are built in a private staging folder beside the target and put in place by one rename.
An existing directory is swapped with the new one in one step (Linux `renameat2(RENAME_EXCHANGE)`),
so at every instant the path holds the complete old or the complete new directory. Where the
exchange is unavailable the old one is first renamed to a sibling `.NAME.old-HOST-PID-RAND`; a
writer killed in that instant leaves it there, and the next writer of NAME puts it back.

    with atomic_directory("q/", overwrite=True) as tmp:
        save_into(tmp)

Leftovers of a killed writer (`.NAME.tmp-HOST-PID-RAND`, `.NAME.old-...`) are removed by the next
writer of NAME once their process is gone (another host's: once untouched for a day).

Permissions: mkstemp and mkdtemp create 0600 / 0700; what this module writes gets the mode open()
and mkdir() would give (0666 / 0777 minus the umask), so results and models can be shared.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

from dllmq.errors import DllmqError

# A leftover of another host cannot be checked for a live owner; after this long untouched it is abandoned.
FOREIGN_LEFTOVER_MAX_AGE = 24 * 3600.0

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
# Temp paths this process is writing right now (its own pid is alive, but they are not leftovers).
_LIVE: set[str] = set()


# ----------------------------------------------------------------------------- permissions

def _umask() -> int:
    try:  # Linux shows it without changing it (changing it races with other threads creating files)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode open() gives a new file: 0666 minus the umask."""
    return 0o666 & ~_umask()


def default_dir_mode() -> int:
    """The mode mkdir() gives a new directory: 0777 minus the umask."""
    return 0o777 & ~_umask()


def make_shareable(path: str | os.PathLike, *, recursive: bool = False) -> None:
    """Give `path` (and with `recursive`, everything under it) the default modes (symlinks untouched)."""
    path = Path(path)
    file_mode, dir_mode = default_file_mode(), default_dir_mode()
    os.chmod(path, dir_mode if path.is_dir() else file_mode)
    if recursive and path.is_dir():
        for root, dirs, files in os.walk(path):
            for name, mode in [(d, dir_mode) for d in dirs] + [(f, file_mode) for f in files]:
                full = os.path.join(root, name)
                if not os.path.islink(full):
                    os.chmod(full, mode)


# ----------------------------------------------------------------------------- whose leftover is this

def pid_alive(pid: int) -> bool:
    """True while process `pid` exists on this host and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    try:  # a killed child not yet reaped by its parent is still signalable; it is dead all the same
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def newest_mtime(path: str | os.PathLike) -> float:
    """The latest modification time of `path` or anything under it."""
    newest = os.stat(path).st_mtime
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                newest = max(newest, os.stat(os.path.join(root, name)).st_mtime)
            except OSError:
                pass
    return newest


def _prefix(target: Path, kind: str) -> str:
    """Names of this process's temp siblings of `target`: .NAME.KIND-HOST-PID- (a random part follows)."""
    return f".{target.name}.{kind}-{socket.gethostname()}-{os.getpid()}-"


def _leftover_name(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.(?P<kind>tmp|old)-(?P<host>.+)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def _abandoned(path: Path, host: str, pid: int) -> bool:
    if host != socket.gethostname():
        try:
            return time.time() - newest_mtime(path) > FOREIGN_LEFTOVER_MAX_AGE
        except OSError:
            return False
    if pid == os.getpid():
        return str(path) not in _LIVE
    return not pid_alive(pid)


def _remove(path: str | os.PathLike) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def clean_leftovers(target: str | os.PathLike) -> list[Path]:
    """Remove the temp siblings of `target` left by writers that died; returns them. If `target` is
    missing and a dead writer left the old one aside (`.NAME.old-...`), it is put back instead."""
    target = Path(target)
    pattern = _leftover_name(target.name)
    try:
        entries = [Path(e.path) for e in os.scandir(target.parent) if e.name.startswith(f".{target.name}.")]
    except OSError:  # no folder yet, or one we cannot list: nothing of ours to clean
        return []
    asides, found = [], []
    for entry in entries:
        m = pattern.match(entry.name)
        if m and _abandoned(entry, m["host"], int(m["pid"])):
            (asides if m["kind"] == "old" else found).append(entry)
    if asides and not os.path.lexists(target):
        newest = max(asides, key=lambda p: p.lstat().st_ctime)  # a rename sets ctime: the last one set aside
        with contextlib.suppress(OSError):
            _rename_noreplace(newest, target)
            asides.remove(newest)
    for entry in found + asides:
        _remove(entry)
    return found + asides


# ----------------------------------------------------------------------------- renames

@lru_cache(maxsize=1)
def _libc_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, or no libc to load
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _renameat2(src: str | os.PathLike, dst: str | os.PathLike, flags: int) -> bool:
    """Linux renameat2 with `flags`: True when done, False when this system or file system cannot do
    it (then nothing changed); any other failure raises OSError."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))


def _rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename `src` to `dst`; FileExistsError if `dst` exists (never replaced)."""
    try:
        if not _renameat2(src, dst, _RENAME_NOREPLACE):
            if os.path.lexists(dst):  # no renameat2: check, then rename (onto a non-empty directory it fails anyway)
                raise FileExistsError(errno.EEXIST, "File exists", os.fspath(dst))
            os.rename(src, dst)
    except OSError as err:  # EEXIST already is a FileExistsError
        if err.errno == errno.ENOTEMPTY:
            raise FileExistsError(errno.EEXIST, "File exists", os.fspath(dst)) from None
        raise


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the data is written all the same
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for root, dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                _fsync(full)
        _fsync(root)


def _swap_through_aside(staged: Path, dest: Path) -> None:
    """Replace `dest` by `staged` with two renames; between them the old one is at .NAME.old-..."""
    aside = dest.with_name(_prefix(dest, "old") + secrets.token_hex(4))
    _LIVE.add(str(aside))
    try:
        os.rename(dest, aside)
        try:
            _rename_noreplace(staged, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                _rename_noreplace(aside, dest)  # put the old one back
            raise
        _remove(aside)
    finally:
        _LIVE.discard(str(aside))


def install_directory(staged: str | os.PathLike, dest: str | os.PathLike, *, replace: bool = True) -> bool:
    """Put the complete directory `staged` (a sibling of `dest`) at `dest` in one rename, with the
    default directory mode and its files on disk. An existing `dest` is swapped out in one step and
    removed when `replace`; otherwise it is kept and False returned (`staged` is left to the caller)."""
    staged, dest = Path(staged), Path(dest)
    os.chmod(staged, default_dir_mode())  # mkdtemp made it private
    _fsync_tree(staged)
    for _ in range(3):  # dest may appear or vanish meanwhile; each turn settles one of those
        try:
            _rename_noreplace(staged, dest)
            break
        except FileExistsError:
            if not replace:
                return False
        try:
            if _renameat2(staged, dest, _RENAME_EXCHANGE):
                _remove(staged)  # the old directory, now under the staging name
            else:
                _swap_through_aside(staged, dest)
            break
        except FileNotFoundError:
            if not os.path.lexists(staged):
                raise
    else:
        raise OSError(errno.EBUSY, f"{dest} keeps changing under concurrent writers")
    _fsync(dest.parent)
    return True


def refuse_existing(out: str | os.PathLike, overwrite: bool, what: str = "output path") -> None:
    """The user-facing refusal to write over an existing `out` without --overwrite."""
    if not overwrite and Path(out).exists():
        raise _exists(out, what)


def _exists(out: str | os.PathLike, what: str) -> DllmqError:
    return DllmqError(f"{out} already exists; choose another {what} or pass --overwrite.")


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, overwrite: bool = False,
                     what: str = "output path") -> Iterator[Path]:
    """Yield a private staging directory beside `out`; when the block succeeds it becomes `out`
    (replacing an existing one in one step if `overwrite`), when it fails it vanishes.
    Without `overwrite` an existing `out` is refused up front (`what` names it in the message)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out)
    refuse_existing(out, overwrite, what)
    staging = Path(tempfile.mkdtemp(prefix=_prefix(out, "tmp"), dir=out.parent))
    _LIVE.add(str(staging))
    try:
        yield staging
        if not install_directory(staging, out, replace=overwrite):
            raise _exists(out, what)  # another writer made it meanwhile
    finally:
        _remove(staging)
        _LIVE.discard(str(staging))


# ----------------------------------------------------------------------------- files

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp file name beside `path` to write to; when the block succeeds the file is synced,
    given the default mode and renamed over `path`, when it fails it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    fd, name = tempfile.mkstemp(prefix=_prefix(path, "tmp"), dir=path.parent)
    os.close(fd)
    _LIVE.add(name)
    try:
        yield Path(name)
        _fsync(name)
        os.chmod(name, default_file_mode())
        os.replace(name, path)
        _fsync(path.parent)
    finally:
        _remove(name)
        _LIVE.discard(name)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = None) -> Iterator[IO]:
    """A file opened for writing ("w": text, UTF-8 unless told; "wb": bytes) that replaces `path`
    only when the block succeeds."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole file: mode 'w' or 'wb', not {mode!r}")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as f:
        yield f


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


# ----------------------------------------------------------------------------- JSON

def jsonable(obj: Any) -> Any:
    """`obj` as strict JSON values: NaN and infinities become null, numpy scalars Python numbers,
    tuples lists, keys strings, anything else its str()."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return jsonable(obj.item())
    except ImportError:
        pass
    return str(obj)


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write `data` as indented JSON (see `jsonable`) to `path`, atomically."""
    path = Path(path)
    with atomic_open(path) as f:
        json.dump(jsonable(data), f, indent=2, ensure_ascii=False)
        f.write("\n")
    return path


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Mapping]) -> Path:
    """Write one JSON object per line (see `jsonable`) to `path`, atomically."""
    path = Path(path)
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(jsonable(row), ensure_ascii=False) + "\n")
    return path
