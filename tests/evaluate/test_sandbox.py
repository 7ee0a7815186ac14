"""The code sandbox: hostile programs are contained and reported as failed samples; the evaluator
carries on; canonical HumanEval solutions pass 164/164 and wrong ones fail."""
from __future__ import annotations

import os
import socket
import textwrap
import time
from pathlib import Path

import pytest

from dllmq.errors import DllmqError
from dllmq.evaluate import sandbox as sb
from dllmq.evaluate.humaneval import canonical_completions, evaluate_humaneval, humaneval_problems

FAST = sb.SandboxLimits(timeout_s=4.0, cpu_s=2, memory_mb=256, output_bytes=64 * 1024, file_size_mb=1,
                        open_files=32, processes=16)


def run(code: str, guard: bool = True, limits: sb.SandboxLimits = FAST) -> sb.SandboxResult:
    return sb.run_program(textwrap.dedent(code), allow_code_execution=True, limits=limits, guard=guard)


def os_layers() -> bool:
    """True where the OS alone contains programs (a dropped uid and a network namespace)."""
    iso = sb.isolation()
    return bool(iso.get("uid_dropped")) and iso.get("network") != "none"


GUARDS = [pytest.param(True, id="guard"),
          pytest.param(False, id="os-only", marks=pytest.mark.skipif(
              "not os_layers()",
              reason="needs root (uid drop) and a network namespace"))]


def assert_evaluator_carries_on():
    ok = run("print('still fine')")
    assert ok.passed, ok


def sandbox_processes_alive() -> list[int]:
    """Live (non-zombie) processes of the sandbox uids."""
    if not sb.isolation().get("uid_dropped"):
        return []
    base = sb._uid_base()
    alive = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            uid, _ = sb._proc_uid_and_env_token(pid, None)
            if uid is not None and base <= uid < base + sb.MAX_SLOTS:
                alive.append(int(pid))
    return alive


def test_requires_explicit_opt_in():
    with pytest.raises(DllmqError, match="allow-code-execution"):
        sb.run_program("print(1)")
    with pytest.raises(DllmqError, match="allow-code-execution"):
        sb.run_programs(["print(1)"])
    with pytest.raises(DllmqError):
        evaluate_humaneval(canonical_completions())


def test_plain_program_passes_and_reports_isolation():
    r = run("import collections, math, re\nprint(sum(range(10)))")
    assert r.passed and r.stdout.strip() == "45" and r.returncode == 0
    assert r.isolation["guard"] is True
    iso = sb.isolation()
    assert iso["network_barrier"] in ("namespace", "guard")


def test_failing_assertion_fails():
    r = run("assert 1 + 1 == 3, 'wrong'")
    assert r.status == "failed" and "AssertionError" in r.detail


def test_infinite_loop_hits_cpu_limit():
    start = time.monotonic()
    r = run("while True:\n    pass")
    assert not r.passed and r.status in ("cpu_limit", "timeout")
    assert time.monotonic() - start < FAST.timeout_s + 3
    assert_evaluator_carries_on()


def test_sleeping_program_hits_wall_clock_limit():
    r = run("import time\ntime.sleep(60)", limits=sb.with_limits(FAST, timeout_s=1.0))
    assert r.status == "timeout" and r.duration_s < 4


@pytest.mark.parametrize("guard", GUARDS)
def test_fork_bomb_is_contained(guard):
    code = """
    import os
    while True:
        try:
            os.fork()
        except OSError:
            pass
    """
    r = run(code, guard=guard, limits=sb.with_limits(FAST, timeout_s=2.0, cpu_s=2))
    assert not r.passed
    time.sleep(0.2)
    assert sandbox_processes_alive() == []
    assert_evaluator_carries_on()


def test_memory_bomb_is_contained():
    r = run("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 1024 * 1024))")
    assert not r.passed and ("MemoryError" in r.stderr or r.status in ("signal", "cpu_limit"))
    assert_evaluator_carries_on()


def test_huge_output_is_capped():
    r = run("while True:\n    print('x' * 10000)")
    assert r.status == "output_limit"
    assert len(r.stdout) + len(r.stderr) <= FAST.output_bytes
    assert_evaluator_carries_on()


@pytest.mark.parametrize("guard", GUARDS)
def test_writing_outside_its_directory_is_refused(tmp_path, guard):
    target = tmp_path / "victim.txt"
    r = run(f"open({str(target)!r}, 'w').write('owned')", guard=guard)
    assert not r.passed and not target.exists()
    r = run("open('inside.txt', 'w').write('fine')\nprint(open('inside.txt').read())", guard=guard)
    assert r.passed and r.stdout.strip() == "fine"


@pytest.mark.parametrize("guard", GUARDS)
def test_deleting_files_outside_is_refused(tmp_path, guard):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("a")
    r = run(f"import os\nos.remove({str(victim)!r})", guard=guard)
    assert not r.passed
    r = run(f"import shutil\nshutil.rmtree({str(folder)!r})", guard=guard)
    assert not r.passed
    assert victim.read_text() == "precious" and (folder / "a.txt").exists()


def test_working_directory_is_fresh_and_removed():
    r = run("import os\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))\nopen('left.txt', 'w').write('x')")
    assert r.passed
    cwd, listing = r.stdout.splitlines()[:2]
    assert listing == "['program.py']"
    assert not Path(cwd).exists()


@pytest.mark.parametrize("guard", GUARDS)
def test_opening_a_socket_gets_nowhere(guard):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        r = run(f"""
        import socket
        s = socket.create_connection(("127.0.0.1", {port}), timeout=1)
        s.sendall(b"exfiltrated")
        """, guard=guard)
        assert not r.passed
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


@pytest.mark.parametrize("guard", GUARDS)
def test_environment_secrets_are_not_visible(monkeypatch, guard):
    monkeypatch.setenv("DLLMQ_TEST_SECRET", "s3cr3t-value")
    r = run("import os\nprint(dict(os.environ))\nassert 'DLLMQ_TEST_SECRET' in os.environ", guard=guard)
    assert not r.passed and "s3cr3t-value" not in r.stdout + r.stderr
    # nor through the evaluator's /proc entry
    r = run("import os\nprint(open('/proc/%d/environ' % os.getppid(), 'rb').read())", guard=guard)
    assert not r.passed and "s3cr3t-value" not in r.stdout + r.stderr


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and line.split()[1] in ("Z", "X") for line in f)
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("guard", GUARDS)
def test_background_process_does_not_outlive_the_sample(guard):
    code = """
    import subprocess, sys
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(p.pid, flush=True)
    """
    r = run(code, guard=guard)
    assert not r.passed
    if not guard:
        assert r.status == "left_processes"
        pid = int(r.stdout.split()[0])
        time.sleep(0.1)
        assert _dead(pid)
    assert sandbox_processes_alive() == []


def test_double_fork_daemon_is_killed():
    if not os_layers():
        pytest.skip("needs root (uid drop) and a network namespace to run without the guard")
    code = """
    import os, time
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            time.sleep(120)
        os._exit(0)
    time.sleep(0.2)
    print("parent done")
    """
    r = run(code, guard=False)
    assert r.status == "left_processes"
    time.sleep(0.1)
    assert sandbox_processes_alive() == []


@pytest.mark.parametrize("code,status", [
    ("import os\nos._exit(0)", "exited_early"),
    ("import sys\nsys.exit(0)", "exited_early"),
    ("import os\nos._exit(3)", "failed"),
    ("import signal\nsignal.raise_signal(signal.SIGTERM)", "signal"),
    ("import signal\nsignal.raise_signal(signal.SIGSEGV)", "signal"),
])
def test_exits_and_signals_fail(code, status):
    r = run(code)
    assert r.status == status and not r.passed


@pytest.mark.parametrize("guard", GUARDS)
def test_killing_itself_fails(guard):
    r = run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", guard=guard)
    assert not r.passed


def test_recursion_overflow_fails():
    r = run("def f(n):\n    return f(n + 1)\nf(0)")
    assert r.status == "failed" and "RecursionError" in r.detail
    r = run("import sys\nsys.setrecursionlimit(10**7)\ndef f(n):\n    return f(n + 1)\nf(0)")
    assert not r.passed
    assert_evaluator_carries_on()


def test_parallel_runs_keep_order_and_isolation():
    codes = [f"print({i})" for i in range(6)] + ["assert False"]
    results = sb.run_programs(codes, allow_code_execution=True, limits=FAST, workers=3)
    assert [r.stdout.strip() for r in results[:6]] == [str(i) for i in range(6)]
    assert all(r.passed for r in results[:6]) and not results[6].passed


def test_canonical_humaneval_solutions_pass_and_wrong_ones_fail():
    problems = humaneval_problems()
    assert len(problems) == 164
    report = evaluate_humaneval(canonical_completions(), problems, allow_code_execution=True, workers=2)
    failures = [(p["task_id"], r.status, r.detail) for p, r in zip(problems, report["results"]) if not r.passed]
    assert failures == [] and report["pass@1"] == 1.0
    wrong = ["    return None\n"] * 3
    report = evaluate_humaneval(wrong, problems[:3], allow_code_execution=True, workers=2)
    assert report["passed"] == 0
