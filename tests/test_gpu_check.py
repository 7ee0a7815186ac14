"""The prepared GPU check (benchmarks/gpu_check.py) parses, refuses to run without a GPU in one sentence,
and its CPU dry run walks every section with every equality passing."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


def test_dry_run_exercises_every_section_and_passes():
    result = run("--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    checks = [line.split("|")[1].strip() for line in table[1:]]
    assert [c for c in checks if c.startswith("calibration")] == [
        "calibration GPTQ W4A16-g128", "calibration AWQ W4A16-g128", "calibration QuaRot W4A4 (GPTQ weights)"]
    assert sum(c.startswith("kernel int8 W8A8") for c in checks) == 2 and sum(c.startswith("kernel int4") for c in checks) == 2
    assert sum(c.startswith("kernel int8 W8A16") for c in checks) == 2
    assert sum(c.startswith("kernel fp8") for c in checks) == 2     # the fake path only: no FP8 kernel on a CPU
    assert sum(c.startswith("generation") for c in checks) == 4
    assert {"evaluation likelihood item", "evaluation generation item"} <= set(checks)
    assert [c for c in checks if c.startswith("profile")] == [
        "profile W8A8 kernel step", "profile W8A8 kernel logits vs fake",
        "profile W4A16-g128 kernel step", "profile W4A16-g128 kernel logits vs fake"]
    assert "top 12 ops by self CPU time, one W8A8 kernel step" in result.stdout
    assert "FAIL" not in result.stdout
    assert sum("PASS" in line for line in table) == 11


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so():
    result = run()
    assert result.returncode == 2 and result.stderr.strip().startswith("error: no CUDA GPU")
    assert run("--help").returncode == 0


def test_only_profile_runs_alone():
    """--only profile builds its own models (without the generation section to hand them over)."""
    result = run("--dry-run", "--only", "profile")
    assert result.returncode == 0, result.stderr[-2000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == [
        "profile W8A8 kernel step", "profile W8A8 kernel logits vs fake",
        "profile W4A16-g128 kernel step", "profile W4A16-g128 kernel logits vs fake"]
    assert "0 syncs" in table[1] and "FAIL" not in result.stdout
