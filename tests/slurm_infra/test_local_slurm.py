"""The local single-node Slurm (slurm/local/start.sh) runs jobs and accounts for them.

These tests need a running Slurm and fail when there is none; POLAR_SKIP_SLURM=1 skips them.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

HOW_TO_START = (
    "start it as root with `bash slurm/local/start.sh`, or set POLAR_SKIP_SLURM=1 to skip "
    "the Slurm tests"
)
# Node states of a node that runs jobs: idle, or busy with jobs submitted by others.
UP_NODE_STATES = {"idle", "mixed", "allocated", "completing"}
TERMINAL_STATES = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "TIMEOUT",
}
# Generous: on two CPUs the jobs may queue behind other tests' jobs.
WAIT_S = 120.0


def require_slurm() -> None:
    """Fail the calling test unless `sinfo` shows a node that is up (skip on POLAR_SKIP_SLURM=1)."""
    if os.environ.get("POLAR_SKIP_SLURM") == "1":
        pytest.skip("POLAR_SKIP_SLURM=1: Slurm tests skipped")
    problem = slurm_problem()
    if problem:
        pytest.fail(f"{problem}; {HOW_TO_START}", pytrace=False)


@functools.cache
def slurm_problem() -> str | None:
    """Why Slurm cannot run the tests, or None. Asked once: `sinfo` takes ~10 s to give up."""
    if shutil.which("sinfo") is None:
        return "Slurm is not installed (no `sinfo` on PATH)"
    try:
        proc = subprocess.run(
            ["sinfo", "--noheader", "--Node", "--format=%N %T"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return "`sinfo` did not answer in 30 s"
    if proc.returncode != 0:
        return f"Slurm is not running: `sinfo` failed: {proc.stderr.strip()}"
    states = {line.split()[1].rstrip("*~#") for line in proc.stdout.splitlines() if line.strip()}
    if not states & UP_NODE_STATES:
        return f"no Slurm node is up (sinfo shows: {proc.stdout.strip() or 'no nodes'})"
    return None


def run(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=True).stdout


def sbatch(workdir: Path, *args: str) -> str:
    """Submit a job that runs in `workdir` and return its id."""
    out = run(
        "sbatch",
        "--parsable",
        f"--chdir={workdir}",
        f"--output={workdir}/slurm-%j.out",
        "--time=5",
        *args,
    )
    # --parsable prints "ID" or "ID;CLUSTER".
    return out.strip().split(";")[0]


def accounting(job_id: str) -> dict[str, tuple[str, str]]:
    """sacct's view of a job's allocations: job id (array tasks as ID_N) -> (state, exit code)."""
    out = run(
        "sacct",
        "--noheader",
        "--parsable2",
        "--allocations",
        f"--jobs={job_id}",
        "--format=JobID,State,ExitCode",
    )
    rows = {}
    for line in out.splitlines():
        jid, state, exit_code = line.split("|")
        # "CANCELLED by 0" -> "CANCELLED"
        rows[jid] = (state.split()[0], exit_code)
    return rows


def wait_for_end(job_id: str, n_jobs: int = 1) -> dict[str, tuple[str, str]]:
    """Poll sacct until `n_jobs` records of `job_id` are in a terminal state; return them."""
    deadline = time.monotonic() + WAIT_S
    rows: dict[str, tuple[str, str]] = {}
    while time.monotonic() < deadline:
        rows = accounting(job_id)
        if len(rows) == n_jobs and all(state in TERMINAL_STATES for state, _ in rows.values()):
            return rows
        time.sleep(0.5)
    pytest.fail(f"job {job_id} not finished after {WAIT_S:.0f} s; sacct shows {rows}")


def wait_until_running(job_id: str) -> None:
    deadline = time.monotonic() + WAIT_S
    state = ""
    while time.monotonic() < deadline:
        state = run("squeue", "--noheader", f"--jobs={job_id}", "--format=%T").strip()
        if state == "RUNNING":
            return
        time.sleep(0.2)
    pytest.fail(f"job {job_id} not running after {WAIT_S:.0f} s (squeue state {state!r})")


@pytest.fixture
def workdir(tmp_path: Path):
    """A fresh working directory; jobs a test leaves behind are cancelled afterwards."""
    submitted: list[str] = []
    yield tmp_path, submitted
    for job_id in submitted:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


def test_debug_partition_is_the_default(workdir):
    require_slurm()
    out = run("sinfo", "--noheader", "--format=%P %a %l")
    assert "debug* up infinite" in out.splitlines()


def test_wrap_job_completes(workdir):
    require_slurm()
    path, submitted = workdir
    job_id = sbatch(path, "--wrap=echo hello from $SLURM_JOB_ID > hello.txt")
    submitted.append(job_id)

    assert wait_for_end(job_id) == {job_id: ("COMPLETED", "0:0")}
    assert (path / "hello.txt").read_text() == f"hello from {job_id}\n"


def test_job_array_completes(workdir):
    require_slurm()
    path, submitted = workdir
    job_id = sbatch(
        path, "--array=0-1", "--wrap=echo $SLURM_ARRAY_TASK_ID > task_$SLURM_ARRAY_TASK_ID.txt"
    )
    submitted.append(job_id)

    rows = wait_for_end(job_id, n_jobs=2)

    assert rows == {f"{job_id}_0": ("COMPLETED", "0:0"), f"{job_id}_1": ("COMPLETED", "0:0")}
    assert (path / "task_0.txt").read_text() == "0\n"
    assert (path / "task_1.txt").read_text() == "1\n"


def test_failing_job_is_failed_with_its_exit_code(workdir):
    require_slurm()
    path, submitted = workdir
    job_id = sbatch(path, "--wrap=exit 3")
    submitted.append(job_id)

    assert wait_for_end(job_id) == {job_id: ("FAILED", "3:0")}


def test_cancelled_job_is_cancelled(workdir):
    require_slurm()
    path, submitted = workdir
    job_id = sbatch(path, "--wrap=sleep 300")
    submitted.append(job_id)
    wait_until_running(job_id)

    cancelled_at = time.monotonic()
    run("scancel", job_id)
    rows = wait_for_end(job_id)

    assert rows[job_id][0] == "CANCELLED"
    # KillWait=5 in slurm.conf; sacct lags a few seconds behind.
    assert time.monotonic() - cancelled_at < 30
