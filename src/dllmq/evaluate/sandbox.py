"""Run model-written code where it cannot hurt the evaluator: the code-execution sandbox.

Every program runs in a fresh interpreter (`python -I -S`), never in the evaluator's process, with
these layers, outermost first:

1. Process: its own session and process group (`start_new_session`); a wall-clock limit after which
   the whole group is killed (`os.killpg`), and after every sample - passed or not - a sweep that
   kills whatever it left behind (processes that called `setsid` to leave the group included: they
   are found by the sandbox's uid, or by a per-sample token in their environment). Resource limits
   set before the program starts, soft = hard: CPU time (RLIMIT_CPU), address space (RLIMIT_AS),
   size of any file written (RLIMIT_FSIZE), open files (RLIMIT_NOFILE), processes and threads
   (RLIMIT_NPROC), no core files. Output is read through pipes and capped; past the cap the
   program is killed. The working directory is a fresh temporary directory, removed afterwards;
   HOME and TMPDIR point into it. The environment is rebuilt from nothing: no variable of the
   evaluator (API keys, tokens) reaches the program. The parent death signal is SIGKILL and
   no_new_privs is set, so setuid binaries gain nothing.
2. Privileges, when the evaluator runs as root: the program drops to a dedicated unprivileged uid
   (one per parallel worker), so the limits above are binding (root may raise hard limits and is
   exempt from RLIMIT_NPROC), files outside its directory are not writable, other processes'
   /proc entries (their environment) are not readable, and the sweep can kill every process of
   that uid. The interpreter must be readable by that uid; when `sys.executable` lives under a
   private directory (a venv under /root), a system interpreter (/usr/bin/python3) is used instead.
3. Network: a fresh network namespace (unshare(CLONE_NEWNET); only a loopback that is down), as
   root directly, otherwise through an unprivileged user namespace where the kernel allows it.
   Where neither is possible, the in-interpreter guard below is the only network barrier.
4. In-interpreter guard (a PEP 578 audit hook installed before the program's first line, which
   Python code cannot remove): refuses creating sockets, spawning or signalling processes
   (fork, exec, subprocess, os.system, kill), loading native code through ctypes, changing
   resource limits, writing, deleting, renaming or chmod-ing anything outside the working
   directory, and reading other processes' /proc entries. It is a second barrier, not a
   substitute for the OS layers: a program that reaches native code some other way could bypass it.

`isolation()` reports which layers apply on this machine; every SandboxResult records it too.

A sample passes when the program runs to its end and exits with status 0: the launcher writes a
per-run random marker to a private pipe after the program returns, so `os._exit(0)`, `sys.exit(0)`
or a signal before the end count as failures. (The marker defends against programs that stop
early, not against one written to read the launcher's memory; that is a question of the tests'
integrity, which no sandbox settles.)

Code execution is refused unless the caller passes allow_code_execution=True, as lm-evaluation-
harness refuses unsafe tasks without confirm_run_unsafe_code.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path

from tqdm.auto import tqdm

from dllmq.errors import DllmqError

log = logging.getLogger(__name__)

# Dedicated uids for sandboxed programs when running as root: one per parallel worker slot, in a
# block per evaluator process (base + pid * MAX_SLOTS + slot; pids < 2^22 keep this below 2^32 - 1).
# Chosen far above regular and systemd dynamic users; override the base with DLLMQ_SANDBOX_UID_BASE.
DEFAULT_UID_BASE = 2_100_000_000
MAX_SLOTS = 64
MARKER_PREFIX = "DLLMQ-SANDBOX-DONE "
TOKEN_VAR = "DLLMQ_SANDBOX_TOKEN"


class CodeExecutionNotAllowed(DllmqError):
    """Raised when model-written code would run without the explicit opt-in."""


def require_opt_in(allow_code_execution: bool, what: str = "this task") -> None:
    if not allow_code_execution:
        raise CodeExecutionNotAllowed(
            f"{what} executes model-written code; pass --allow-code-execution (allow_code_execution=True) "
            "to run it inside dllmq's sandbox."
        )


@dataclass(frozen=True)
class SandboxLimits:
    """What one program may use. Defaults suit HumanEval / MBPP tests on a loaded 2-core machine."""

    timeout_s: float = 10.0          # wall clock, from start to the whole group being killed
    cpu_s: int = 10                  # RLIMIT_CPU (SIGXCPU, then SIGKILL one second later)
    memory_mb: int = 1024            # RLIMIT_AS
    output_bytes: int = 1 << 20      # stdout + stderr; more and the program is killed
    file_size_mb: int = 16           # RLIMIT_FSIZE: largest file it can write
    open_files: int = 64             # RLIMIT_NOFILE
    processes: int = 64              # RLIMIT_NPROC, threads included (on top of the uid's current count)

    def __post_init__(self):
        for name in ("timeout_s", "cpu_s", "memory_mb", "output_bytes", "file_size_mb", "open_files", "processes"):
            if getattr(self, name) <= 0:
                raise DllmqError(f"Sandbox limit {name} must be positive, got {getattr(self, name)}.")


@dataclass
class SandboxResult:
    """The verdict on one program. `status`: passed, or a failure: failed (non-zero exit, e.g. an
    assertion), timeout (wall clock), cpu_limit, output_limit, signal (killed by a signal),
    exited_early (status 0 before the end: os._exit, sys.exit), left_processes (finished but left
    processes running; they were killed), error (the sandbox itself could not run it)."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    isolation: dict = field(default_factory=dict)
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self, max_chars: int = 2000) -> dict:
        d = asdict(self)
        d["stdout"], d["stderr"] = self.stdout[-max_chars:], self.stderr[-max_chars:]
        return d


# ----------------------------------------------------------------------------- the launcher
# _sandbox_launcher.py runs inside the sandboxed interpreter before the program: namespaces,
# privileges, limits, guard, then the program; writes the marker after the program returns. Its text
# is passed with -c, read here once.
_LAUNCHER = resources.files(__package__).joinpath("_sandbox_launcher.py").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- environment probes
def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _uid_base() -> int:
    """The first sandbox uid of this evaluator process: a block of MAX_SLOTS uids per process id,
    so two evaluators running at once never share (and never sweep) each other's uids."""
    return int(os.environ.get("DLLMQ_SANDBOX_UID_BASE", DEFAULT_UID_BASE)) + os.getpid() * MAX_SLOTS


def _candidate_pythons() -> list[str]:
    seen, out = set(), []
    for p in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")):
        if p and p not in seen and os.path.exists(p):
            seen.add(p)
            out.append(p)
    return out


def _launch(python: str, cfg: dict, workdir: str, env: dict, marker_w: int) -> subprocess.Popen:
    return subprocess.Popen(
        [python, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)],
        cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        pass_fds=(marker_w,), close_fds=True, start_new_session=True,
    )


_PROBE = "import collections, heapq, itertools, math, re, string, json, functools\nprint('ok')\n"


_setup_lock = threading.Lock()


def _setup() -> dict:
    """Which interpreter and which layers this machine gives, probed once with a real launch."""
    with _setup_lock:
        return _probe_setup()


@lru_cache(maxsize=1)
def _probe_setup() -> dict:
    want_netns = os.environ.get("DLLMQ_SANDBOX_NETNS", "1") != "0"
    if _is_root() and os.environ.get("DLLMQ_SANDBOX_DROP_UID", "1") != "0":
        for python in _candidate_pythons():
            result = _run_one(_PROBE, SandboxLimits(timeout_s=30), python=python, uid=_uid_base(), guard=True,
                              netns=want_netns)
            if result.passed and "ok" in result.stdout:
                return {"python": python, "drop_uid": True, "netns": want_netns, "isolation": result.isolation}
            log.info("sandbox: %s cannot run as an unprivileged uid (%s)", python, result.detail or result.stderr[-200:])
        log.warning("sandbox: no interpreter runs as an unprivileged uid here; programs run as root, "
                    "contained by limits, namespaces and the guard only")
    result = _run_one(_PROBE, SandboxLimits(timeout_s=30), python=sys.executable, uid=None, guard=True,
                      netns=want_netns)
    if not result.passed:
        raise DllmqError(f"The code sandbox cannot start a Python interpreter here ({result.detail or result.stderr[-300:]}).")
    return {"python": sys.executable, "drop_uid": False, "netns": want_netns, "isolation": result.isolation}


def isolation() -> dict:
    """The layers that apply on this machine: interpreter, uid drop, network namespace, guard."""
    s = _setup()
    iso = dict(s["isolation"])
    iso["python"] = s["python"]
    iso["network_barrier"] = "namespace" if iso.get("network", "none") != "none" else "guard"
    return iso


# ----------------------------------------------------------------------------- process handling
def _proc_uid_and_env_token(pid: str, token: bytes | None) -> tuple[int | None, bool]:
    """The uid of a live process and whether its environment holds `token`; (None, False) for
    processes that are gone or zombies (already dead, waiting to be reaped)."""
    uid = None
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"State:") and line.split()[1] in (b"Z", b"X"):
                    return None, False
                if line.startswith(b"Uid:"):
                    uid = int(line.split()[1])
                    break
    except (OSError, IndexError, ValueError):
        return None, False
    has_token = False
    if token is not None:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                has_token = token in f.read()
        except OSError:
            pass
    return uid, has_token


def _sweep(pgid: int, uid: int | None, token: str, exclude: int | None = None) -> int:
    """Kill the program's process group and every process it left behind (by uid or by the token
    in their environment); returns how many live ones were found besides `exclude` (the program
    itself). Repeats until a pass finds nothing (a fork bomb keeps forking)."""
    needle = f"{TOKEN_VAR}={token}".encode()
    found_total = 0
    me = os.getpid()
    for _ in range(50):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        found = 0
        try:
            pids = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != me]
        except OSError:
            return found_total
        for pid in pids:
            puid, has_token = _proc_uid_and_env_token(pid, needle)
            if (uid is not None and puid == uid) or has_token:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                    found += int(pid) != exclude
                except (ProcessLookupError, PermissionError):
                    pass
        found_total += found
        if not found:
            break
        time.sleep(0.01)
    return found_total


def _count_threads_of_uid(uid: int) -> int:
    n = 0
    try:
        pids = os.listdir("/proc")
    except OSError:  # no procfs: RLIMIT_NPROC then counts from zero
        return 0
    for pid in pids:
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                fields = dict(line.split(b":", 1) for line in f if b":" in line)
            if int(fields[b"Uid"].split()[0]) == uid:
                n += int(fields[b"Threads"].strip())
        except (OSError, KeyError, ValueError):
            continue
    return n


def _clean_env(workdir: str, token: str) -> dict:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", TOKEN_VAR: token}


def _remove_tree(path: str) -> None:
    def onerror(func, p, exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=onerror)


def _run_one(code: str, limits: SandboxLimits, *, python: str, uid: int | None, guard: bool,
             netns: bool) -> SandboxResult:
    start = time.monotonic()
    token = secrets.token_hex(16)
    nonce = MARKER_PREFIX + secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="dllmq-sandbox-")
    marker_r, marker_w = os.pipe()
    proc = None
    try:
        Path(workdir, "program.py").write_text(code, encoding="utf-8")
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(os.path.join(workdir, "program.py"), uid, uid)
        os.chmod(workdir, 0o700)
        nproc = limits.processes + (0 if uid is not None else _count_threads_of_uid(os.getuid()))
        rlimits = [("RLIMIT_CPU", limits.cpu_s), ("RLIMIT_AS", limits.memory_mb << 20),
                   ("RLIMIT_FSIZE", limits.file_size_mb << 20), ("RLIMIT_NOFILE", limits.open_files),
                   ("RLIMIT_NPROC", nproc), ("RLIMIT_CORE", 0)]
        cfg = {"fd": marker_w, "nonce": nonce, "uid": uid, "gid": uid, "netns": netns, "guard": guard,
               "rlimits": rlimits}
        try:
            proc = _launch(python, cfg, workdir, _clean_env(workdir, token), marker_w)
        except OSError as err:
            return SandboxResult("error", None, "", "", time.monotonic() - start, detail=f"could not start: {err}")
        finally:
            os.close(marker_w)
        return _supervise(proc, marker_r, nonce, limits, start, uid, token)
    finally:
        if proc is not None:
            _sweep(proc.pid, uid, token)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        os.close(marker_r)
        _remove_tree(workdir)


def _supervise(proc: subprocess.Popen, marker_r: int, nonce: str, limits: SandboxLimits, start: float,
               uid: int | None, token: str) -> SandboxResult:
    deadline = start + limits.timeout_s
    sel = selectors.DefaultSelector()
    buffers = {"stdout": bytearray(), "stderr": bytearray(), "marker": bytearray()}
    sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
    sel.register(marker_r, selectors.EVENT_READ, "marker")
    total_out = 0
    status, detail = None, ""
    exited_at = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                status, detail = "timeout", f"still running after {limits.timeout_s:g} s wall clock"
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.25:
                break  # the program is gone; a left-behind process holds the pipes open
            for key, _ in sel.select(timeout=min(0.05, max(deadline - now, 0.001))):
                fileobj = key.fileobj
                fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(fileobj)
                    continue
                name = key.data
                if name == "marker":
                    buffers[name] += chunk[:4096]
                    continue
                total_out += len(chunk)
                room = limits.output_bytes - len(buffers["stdout"]) - len(buffers["stderr"])
                if room > 0:
                    buffers[name] += chunk[:room]
                if total_out > limits.output_bytes:
                    status, detail = "output_limit", f"wrote more than {limits.output_bytes} bytes of output"
                    break
            if status:
                break
    finally:
        sel.close()
    if status is None and proc.poll() is None:
        # its pipes are closed but the program has not finished exiting (or closed them and runs on)
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.001))
        except subprocess.TimeoutExpired:
            status, detail = "timeout", f"still running after {limits.timeout_s:g} s wall clock"
    # Kill the group and anything that escaped it before judging; this also ends runaway output.
    left_behind = _sweep(proc.pid, uid, token, exclude=proc.pid)
    try:
        returncode = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        returncode = None
    duration = time.monotonic() - start
    marker = buffers["marker"].decode("utf-8", "replace")
    iso = {}
    for line in marker.splitlines():
        if line.startswith("ISOLATION "):
            try:
                iso = json.loads(line[len("ISOLATION "):])
            except ValueError:
                pass
    finished = nonce in marker.splitlines()
    stdout = buffers["stdout"].decode("utf-8", "replace")
    stderr = buffers["stderr"].decode("utf-8", "replace")
    if status is None:
        if returncode is None:
            status, detail = "timeout", "did not exit"
        elif returncode == 0 and finished and left_behind:
            status, detail = "left_processes", f"left {left_behind} process(es) running after it exited (killed)"
        elif returncode == 0 and finished:
            status = "passed"
        elif returncode == 0:
            status, detail = "exited_early", "exited with status 0 before reaching the end of the program"
        elif returncode < 0:
            sig = -returncode
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            if sig == signal.SIGXCPU:
                status, detail = "cpu_limit", f"killed by {name} (CPU time limit)"
            else:
                status, detail = "signal", f"killed by {name}"
        else:
            status = "failed"
            last = stderr.strip().splitlines()[-1:] if stderr.strip() else []
            detail = f"exit status {returncode}" + (f": {last[0][:300]}" if last else "")
    return SandboxResult(status, returncode, stdout, stderr, duration, iso, detail)


# ----------------------------------------------------------------------------- public API
_slots: queue.Queue | None = None
_slots_lock = threading.Lock()


def _acquire_slot() -> int:
    global _slots
    with _slots_lock:
        if _slots is None:
            _slots = queue.Queue()
            for i in range(MAX_SLOTS):
                _slots.put(i)
    return _slots.get()


def run_program(code: str, *, allow_code_execution: bool = False, limits: SandboxLimits | None = None,
                guard: bool = True) -> SandboxResult:
    """Run one Python program in the sandbox and judge it (see the module docstring).

    `guard=False` leaves out the in-interpreter audit hook, to test the OS layers alone; it is
    refused where no network namespace is available, since the guard is then the network barrier.
    """
    require_opt_in(allow_code_execution, "Running model-written code")
    limits = limits or SandboxLimits()
    s = _setup()
    if not guard and s["isolation"].get("network", "none") == "none":
        raise DllmqError("guard=False needs a network namespace, which this machine does not allow; keep the guard on.")
    slot = _acquire_slot()
    try:
        uid = _uid_base() + slot if s["drop_uid"] else None
        return _run_one(code, limits, python=s["python"], uid=uid, guard=guard, netns=s["netns"])
    finally:
        _slots.put(slot)


def run_programs(codes: Sequence[str], *, allow_code_execution: bool = False, limits: SandboxLimits | None = None,
                 workers: int | None = None, progress: bool = False, desc: str = "sandbox") -> list[SandboxResult]:
    """`run_program` over many programs with a small thread pool (each thread waits on one child
    process); results in input order. One program's failure never stops the others."""
    require_opt_in(allow_code_execution, "Running model-written code")
    if not codes:
        return []
    workers = max(1, min(workers or min(4, (os.cpu_count() or 2)), len(codes), MAX_SLOTS))
    _setup()  # probe once, before the threads start

    def one(code: str) -> SandboxResult:
        try:
            return run_program(code, allow_code_execution=True, limits=limits)
        except Exception as err:  # a sandbox failure is a failed sample, never a crashed evaluation
            return SandboxResult("error", None, "", "", 0.0, detail=f"{type(err).__name__}: {err}")


    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(one, codes), total=len(codes), desc=desc, disable=not progress))


def with_limits(limits: SandboxLimits | None = None, **changes) -> SandboxLimits:
    return replace(limits or SandboxLimits(), **changes)
