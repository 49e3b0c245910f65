"""Helpers of the sweep tests: sweep files written for a test, the CLI run in-process, metrics
comparison, and the Slurm requirement."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

# A dataset small enough to write in seconds, big enough for runs of a few hundred steps.
DATASET = {
    "world": {"families": 4, "members_per_family": 3},
    "prompts": {"train": 120, "heldout_prompts": 16, "heldout_policies": 16},
    "sampling": {"max_new_tokens": 16},
    "kl": {"enabled": False},
    "workers": 1,
    "progress": False,
}

# The smallest real pre-training run: t12k, batch 4, a few evaluations, frequent checkpoints.
RUN_CONFIG = {
    "data": {"eval_pairs": 16},
    "batch": {"size": 4},
    "schedule": {"eval_points": 4, "checkpoint_every": 5, "log_every": 5, "progress": False},
}


# The smallest base LM: 8 steps of 4 rows of 64 tokens.
BASE = {
    "budget": {"tokens": 2048},
    "config": {"data": {"seq_len": 64, "eval_rows": 8}, "batch": {"size": 4},
               "schedule": {"eval_points": 2, "progress": False}},
}


def write_sweep(path: Path, dataset: Path | str | None, **sections) -> Path:
    """A pre-training sweep file; ``sections`` replace top-level keys.

    ``dataset``: an existing dataset directory, or None for the whole chain: a `generate`
    run for the data, then a base LM per size (`lm` runs), then the pre-training runs.
    """
    chain = {"data": {"generate": DATASET}, "base": BASE}
    doc = {
        "name": "t",
        "stage": "pretrain",
        **({"data": {"dir": str(dataset)}} if dataset is not None else chain),
        "config": RUN_CONFIG,
        "grid": {"sizes": ["t12k"], "budgets": [{"tokens": 4000}], "seeds": [0]},
        "resources": {"time": 10},
        "launch": {"parallelism": 2},
    }
    doc.update(sections)
    doc = {k: v for k, v in doc.items() if v is not None}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def polar_sweep(*argv) -> tuple[int, str]:
    """Run ``polar-sweep ARGV`` in this process; returns (exit code, stdout + stderr)."""
    from polar_scaling.sweep.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        code = main([str(a) for a in argv])
    return code, buf.getvalue()


def read_rows(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def assert_same_metrics(a: Path, b: Path, tol: float = 1e-6) -> None:
    """Two metrics.jsonl files hold the same rows, numbers equal to ``tol`` (relative)."""
    rows_a, rows_b = read_rows(a), read_rows(b)
    assert [sorted(r) for r in rows_a] == [sorted(r) for r in rows_b]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key, va in ra.items():
            vb = rb[key]
            if isinstance(va, float):
                assert abs(va - vb) <= tol * max(1.0, abs(va)), (key, ra["step"], va, vb)
            else:
                assert va == vb, (key, ra.get("step"), va, vb)


HOW_TO_START = ("start it as root with `bash slurm/local/start.sh`, or set POLAR_SKIP_SLURM=1 "
                "to skip the Slurm tests")


@functools.cache
def slurm_problem() -> str | None:
    """Why Slurm cannot run jobs here, or None."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "Slurm is not installed (no sbatch/sinfo on PATH)"
    try:
        proc = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%T"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"sinfo failed: {e}"
    states = proc.stdout.split()
    if proc.returncode != 0 or not states:
        return f"sinfo shows no node: {(proc.stderr or proc.stdout).strip()[:200]}"
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"no Slurm node is up (states: {' '.join(states)})"
    return None


def require_slurm() -> None:
    if os.environ.get("POLAR_SKIP_SLURM") == "1":
        pytest.skip("POLAR_SKIP_SLURM=1: Slurm tests skipped")
    problem = slurm_problem()
    if problem:
        pytest.fail(f"{problem}; {HOW_TO_START}", pytrace=False)
