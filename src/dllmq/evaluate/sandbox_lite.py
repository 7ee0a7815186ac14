"""Run model-written code and its asserts in a separate, limited process (never in ours).

A stand-in until the full sandbox of the evaluation issue lands: a fresh isolated Python (`-I`:
no user site, no environment variables, no cwd on sys.path) in a throwaway directory, with a
wall-clock timeout, CPU-time / memory / file-size limits (POSIX), and truncated output.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

MAX_OUTPUT = 2000


@dataclass(frozen=True)
class RunResult:
    passed: bool
    status: str      # passed | failed | timeout
    output: str      # stderr/stdout, truncated


def _limits(memory_bytes: int, cpu_seconds: int):
    def apply():  # runs in the child before exec
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        os.setsid()
    return apply if os.name == "posix" else None


def run_program(program: str, tests: Sequence[str] = (), *, timeout: float = 5.0,
                memory_bytes: int = 512 << 20) -> RunResult:
    """Run `program` followed by `tests` (assert lines); passed when the process exits 0 in time."""
    source = program.rstrip("\n") + "\n\n" + "\n".join(tests) + "\n"
    with tempfile.TemporaryDirectory(prefix="dllmq-run-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONDONTWRITEBYTECODE": "1", "HOME": tmp}
        try:
            proc = subprocess.run([sys.executable, "-I", "-S", path], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=timeout,
                                  preexec_fn=_limits(memory_bytes, max(1, int(timeout) + 1)))
        except subprocess.TimeoutExpired as err:
            out = (err.stderr or b"")[-MAX_OUTPUT:].decode("utf-8", "replace")
            return RunResult(False, "timeout", out)
    out = (proc.stderr or proc.stdout or b"")[-MAX_OUTPUT:].decode("utf-8", "replace")
    return RunResult(proc.returncode == 0, "passed" if proc.returncode == 0 else "failed", out)


def run_many(programs: Sequence[tuple[str, Sequence[str]]], *, timeout: float = 5.0, workers: int = 2) -> list[RunResult]:
    """`run_program` over (program, tests) pairs, a few processes at a time; results in order."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda pt: run_program(pt[0], pt[1], timeout=timeout), programs))
