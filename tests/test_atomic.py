"""dllmq.atomic: files and directories appear whole or not at all, with the modes the umask gives."""
import json
import math
import os
import socket
import stat
import subprocess
import sys

import numpy as np
import pytest

from dllmq import atomic
from dllmq.atomic import (atomic_directory, atomic_open, atomic_path, clean_leftovers, install_directory,
                          write_bytes_atomic, write_json_atomic, write_jsonl_atomic, write_text_atomic)
from dllmq.errors import DllmqError

HOST = socket.gethostname()


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(params=["exchange", "two renames"])
def swap(request, monkeypatch):
    """Run a test with renameat2 (when this system has it) and with the plain-rename fallback."""
    if request.param == "exchange":
        if not _exchange_works(request.getfixturevalue("tmp_path")):
            pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    else:
        monkeypatch.setattr(atomic, "_libc_renameat2", lambda: None)
    return request.param


def _exchange_works(folder) -> bool:
    (folder / "x").mkdir()
    (folder / "y").mkdir()
    try:
        return atomic._renameat2(folder / "x", folder / "y", atomic._RENAME_EXCHANGE)
    finally:
        (folder / "x").rmdir()
        (folder / "y").rmdir()


def tree(folder) -> dict:
    """{relative path: content} of every file under `folder`."""
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def make_dir(folder, files: dict):
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


OLD = {"config.json": "old", "sub/weights": "old weights"}
NEW = {"config.json": "new", "sub/weights": "new weights", "extra": "x"}


# ----------------------------------------------------------------------------- files

@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failed_file_write_keeps_the_old_file_and_no_temp_file(tmp_path, error):
    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(error):
        with atomic_open(path) as f:
            f.write("half of the new")
            f.flush()
            raise error()
    assert path.read_text() == "old" and names(tmp_path) == ["results.json"]
    with pytest.raises(error):
        with atomic_path(tmp_path / "new.bin") as tmp:
            tmp.write_bytes(b"half")
            raise error()
    assert names(tmp_path) == ["results.json"]


def test_file_writers_replace_whole_files(tmp_path):
    write_text_atomic(tmp_path / "a.txt", "héllo\n")
    write_text_atomic(tmp_path / "a.txt", "second")
    write_bytes_atomic(tmp_path / "deep" / "b.bin", b"\x00\x01")   # the folder is made
    with atomic_path(tmp_path / "c.bin") as tmp:
        tmp.write_bytes(b"by name")
    assert (tmp_path / "a.txt").read_text() == "second"
    assert (tmp_path / "deep" / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "c.bin").read_bytes() == b"by name"
    assert names(tmp_path) == ["a.txt", "c.bin", "deep"]
    with pytest.raises(ValueError):
        with atomic_open(tmp_path / "a.txt", "a"):
            pass


def test_json_and_jsonl_round_trip(tmp_path):
    data = {"task": "gsm8k", "acc": 0.5, "n": np.int64(7), "x": np.float32(0.25), "nan": math.nan,
            "inf": -math.inf, 3: (1, 2), "nested": [{"ünïcode": "✓"}], "path": tmp_path}
    expected = {"task": "gsm8k", "acc": 0.5, "n": 7, "x": 0.25, "nan": None, "inf": None, "3": [1, 2],
                "nested": [{"ünïcode": "✓"}], "path": str(tmp_path)}
    path = write_json_atomic(tmp_path / "r.json", data)
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == expected
    assert text == json.dumps(expected, indent=2, ensure_ascii=False) + "\n"   # the format results always had
    rows = [{"i": i, "v": float(i) / 3, "bad": math.nan} for i in range(5)]
    path = write_jsonl_atomic(tmp_path / "s.jsonl", iter(rows))
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{**r, "bad": None} for r in rows]


def test_written_files_and_directories_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        assert atomic.default_file_mode() == 0o640 and atomic.default_dir_mode() == 0o750
        write_json_atomic(tmp_path / "r.json", {"a": 1})
        write_jsonl_atomic(tmp_path / "s.jsonl", [{"a": 1}])
        with atomic_directory(tmp_path / "model") as tmp:
            (tmp / "config.json").write_text("{}")
            write_text_atomic(tmp / "inner.txt", "x")
    finally:
        os.umask(previous)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "r.json") == mode(tmp_path / "s.jsonl") == 0o640          # not mkstemp's 0600
    assert mode(tmp_path / "model") == 0o750                                           # not mkdtemp's 0700
    assert mode(tmp_path / "model" / "config.json") == mode(tmp_path / "model" / "inner.txt") == 0o640


def test_make_shareable_opens_a_private_tree(tmp_path):
    top = make_dir(tmp_path / "top", OLD)
    for p in [top, top / "sub"]:
        p.chmod(0o700)
    for p in [top / "config.json", top / "sub" / "weights"]:
        p.chmod(0o600)
    previous = os.umask(0o022)
    try:
        atomic.make_shareable(top, recursive=True)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [top, top / "sub", top / "config.json",
                                                              top / "sub" / "weights"]}
    assert modes == {"top": 0o755, "sub": 0o755, "config.json": 0o644, "weights": 0o644}


# ----------------------------------------------------------------------------- directories

def test_a_new_directory_appears_whole(tmp_path, swap):
    out = tmp_path / "q"
    with atomic_directory(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".q.tmp-") and not out.exists()
        make_dir(tmp, NEW)
    assert tree(out) == NEW and names(tmp_path) == ["q"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failed_build_keeps_the_complete_old_directory(tmp_path, swap, error):
    out = make_dir(tmp_path / "q", OLD)
    with pytest.raises(error):
        with atomic_directory(out, overwrite=True) as tmp:
            make_dir(tmp, NEW)
            raise error()
    assert tree(out) == OLD and names(tmp_path) == ["q"]


def test_a_successful_replace_leaves_the_complete_new_directory(tmp_path, swap):
    out = make_dir(tmp_path / "q", OLD)
    with atomic_directory(out, overwrite=True) as tmp:
        make_dir(tmp, NEW)
        assert tree(out) == OLD          # readers see the old one until the end
    assert tree(out) == NEW and names(tmp_path) == ["q"]


def test_the_exchange_never_moves_the_old_directory_aside(tmp_path, monkeypatch):
    if not _exchange_works(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")

    def aside(*args):
        raise AssertionError("the old directory was moved aside")

    monkeypatch.setattr(atomic, "_swap_through_aside", aside)
    out = make_dir(tmp_path / "q", OLD)
    with atomic_directory(out, overwrite=True) as tmp:
        make_dir(tmp, NEW)
    assert tree(out) == NEW and names(tmp_path) == ["q"]


def test_interrupted_between_the_two_renames_the_old_directory_comes_back(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_libc_renameat2", lambda: None)
    out = make_dir(tmp_path / "q", OLD)
    real = atomic._rename_noreplace

    def interrupted(src, dst):
        if str(src).startswith(str(tmp_path / ".q.tmp-")) and not out.exists():  # the old one just went aside
            assert [n for n in names(tmp_path) if n.startswith(".q.old-")]
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(atomic, "_rename_noreplace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out, overwrite=True) as tmp:
            make_dir(tmp, NEW)
    assert tree(out) == OLD and names(tmp_path) == ["q"]


def test_the_next_writer_restores_an_old_directory_a_killed_writer_left_aside(tmp_path, dead_pid):
    """A writer killed between its two renames left the old directory at .q.old-... and its staging
    folder: the next writer of q puts the old one back first, so without --overwrite it refuses."""
    out = tmp_path / "q"
    make_dir(tmp_path / f".q.old-{HOST}-{dead_pid}-0a1b2c3d", OLD)
    make_dir(tmp_path / f".q.tmp-{HOST}-{dead_pid}-zz_9", {"config.json": "half"})
    with pytest.raises(DllmqError, match="already exists"):
        with atomic_directory(out):
            pass
    assert tree(out) == OLD and names(tmp_path) == ["q"]


def test_leftovers_are_removed_only_when_their_writer_is_gone(tmp_path, dead_pid):
    out = make_dir(tmp_path / "q", OLD)
    gone = [make_dir(tmp_path / f".q.tmp-{HOST}-{dead_pid}-abc", {"f": "1"}),
            make_dir(tmp_path / f".q.old-{HOST}-{dead_pid}-def", {"f": "2"}),     # q exists: this one goes
            make_dir(tmp_path / f".q.tmp-{HOST}-{os.getpid()}-ghi", {"f": "3"}),  # this process, not writing it
            make_dir(tmp_path / ".q.tmp-elsewhere-12-jkl", {"f": "4"})]           # another host, a day old
    os.utime(gone[-1] / "f", (0, 0))
    os.utime(gone[-1], (0, 0))
    kept = [make_dir(tmp_path / f".q.tmp-{HOST}-{os.getppid()}-mno", {"f": "5"}),  # a live writer
            make_dir(tmp_path / ".q.tmp-elsewhere-12-pqr", {"f": "6"}),            # another host, fresh
            make_dir(tmp_path / f".qq.tmp-{HOST}-{dead_pid}-stu", {"f": "7"}),     # another target's
            make_dir(tmp_path / ".q.backup", {"f": "8"})]                           # not ours at all
    assert sorted(clean_leftovers(out)) == sorted(gone)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in gone) and tree(out) == OLD
    write_text_atomic(tmp_path / "file.txt", "x")   # file writers clean up the same way
    (tmp_path / f".file.txt.tmp-{HOST}-{dead_pid}-x1").write_text("half")
    write_text_atomic(tmp_path / "file.txt", "y")
    assert not (tmp_path / f".file.txt.tmp-{HOST}-{dead_pid}-x1").exists()


def test_without_overwrite_an_existing_directory_is_refused(tmp_path):
    out = make_dir(tmp_path / "q", OLD)
    with pytest.raises(DllmqError, match=r"q already exists; choose another --out or pass --overwrite\.$"):
        with atomic_directory(out, what="--out"):
            raise AssertionError("never built")
    assert tree(out) == OLD and names(tmp_path) == ["q"]


def test_a_directory_made_meanwhile_by_another_writer_is_kept(tmp_path, swap):
    out = tmp_path / "q"
    with pytest.raises(DllmqError, match="already exists"):
        with atomic_directory(out) as tmp:
            make_dir(tmp, NEW)
            make_dir(out, OLD)             # another process finished first
    assert tree(out) == OLD and names(tmp_path) == ["q"]
    staged = make_dir(tmp_path / ".q.tmp-mine", NEW)
    assert install_directory(staged, out, replace=False) is False and tree(staged) == NEW
    assert install_directory(staged, out, replace=True) is True and tree(out) == NEW
    assert names(tmp_path) == ["q"]


def test_save_model_overwrite_swaps_in_the_new_model(tmp_path):
    from dllmq.models.loading import save_model
    from dllmq.models.random_models import random_model
    from dllmq.models.safetensors_io import load_tensors

    out = tmp_path / "m"
    first, tok = random_model("random-llada", seed=1)
    second, _ = random_model("random-llada", seed=2)
    save_model(first, tok, out)
    with pytest.raises(DllmqError, match="already exists"):
        save_model(second, tok, out)
    save_model(second, tok, out, overwrite=True)
    loaded = load_tensors(out)
    key = next(iter(second.state_dict()))
    assert (loaded[key] == second.state_dict()[key]).all() and not (loaded[key] == first.state_dict()[key]).all()
    assert names(tmp_path) == ["m"] and stat.S_IMODE(out.stat().st_mode) == atomic.default_dir_mode()
