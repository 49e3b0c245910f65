"""End to end on the local single-node Slurm (slurm/local/start.sh): a three-run job array
through sbatch, idempotent launches, and preemption: USR2 (checkpoint, requeue, resume), a
hard `scontrol requeue` (killed, restarts from the latest periodic checkpoint) and the time
limit (Slurm's USR2 before it, from the batch script's --signal; requeue). Every interrupted run must end with the same metrics.jsonl as
an uninterrupted run of the same config. These tests fail when Slurm is down (set
POLAR_SKIP_SLURM=1 to skip them).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from sweep_helpers import assert_same_metrics, polar_sweep, read_rows, require_slurm, write_sweep

from polar_scaling.sweep.spec import load_sweep
from polar_scaling.sweep.store import Store

pytestmark = pytest.mark.slurm

BUDGET = 8000  # tokens: ~16 steps of 4 pairs


def jobs_of(store, run_id):
    return [s["job_id"] for s in store.read_record(run_id).get("submissions", [])]


def events(store, run_id, name):
    path = store.run_dir(run_id) / "sweep_events.jsonl"
    return [e for e in read_rows(path) if e["event"] == name] if path.exists() else []


def last_step(store, run_id):
    path = store.run_dir(run_id) / "metrics.jsonl"
    rows = read_rows(path) if path.exists() else []
    return max((r["step"] for r in rows), default=0)


@pytest.fixture(scope="module")
def array_sweep(tmp_path_factory):
    """The data, a base LM, then three runs from them (seeds 0-2) as one job array, each job
    waiting for the ones before it (afterok); launched and waited for."""
    require_slurm()
    tmp = tmp_path_factory.mktemp("slurm-array")
    path = write_sweep(tmp / "s.yaml", None, grid={
        "sizes": ["t12k"], "budgets": [{"tokens": BUDGET}], "seeds": [0, 1, 2]})
    root = tmp / "root"
    sweep = load_sweep(path, root=root)
    store = Store(root)
    try:
        first = polar_sweep("launch", path, "--root", root, "--executor", "slurm")
        again = polar_sweep("launch", path, "--root", root, "--executor", "slurm")
        states_during = {s.run.run_id: s.state for s in store.status(sweep)}
        waited = polar_sweep("status", path, "--root", root, "--watch", "--poll", "1")
        after = polar_sweep("launch", path, "--root", root, "--executor", "slurm")
        collected = polar_sweep("collect", path, "--root", root)
    finally:
        polar_sweep("cancel", path, "--root", root)
    return {"path": path, "root": root, "sweep": sweep, "store": store, "first": first,
            "again": again, "states_during": states_during, "waited": waited,
            "after": after, "collected": collected}


def test_three_run_array_through_sbatch(array_sweep):
    sweep, store = array_sweep["sweep"], array_sweep["store"]
    code, out = array_sweep["first"]
    assert code == 0, out
    assert "5 run(s) to submit with executor slurm" in out
    data, base, *runs = sweep.runs
    job_ids = [jobs_of(store, r.run_id) for r in sweep.runs]
    assert all(len(j) == 1 for j in job_ids)
    data_job, base_job = job_ids[0][0], job_ids[1][0]
    array_id = job_ids[2][0].split("_")[0]
    assert sorted(j[0] for j in job_ids[2:]) == [f"{array_id}_{i}" for i in range(3)]
    assert f"submitted pretrain-t12k: job {array_id} (array of 3)" in out
    lines = (store.scripts_dir / f"{array_id}-pretrain-t12k.sbatch").read_text().splitlines()
    assert "#SBATCH --array=0-2%2" in lines
    assert f"#SBATCH --dependency=afterok:{data_job}:{base_job}" in lines
    assert "#SBATCH --kill-on-invalid-dep=yes" in lines
    lines = (store.scripts_dir / f"{base_job}-lm-t12k.sbatch").read_text().splitlines()
    assert f"#SBATCH --dependency=afterok:{data_job}" in lines
    # afterok held every job until the ones it needs had finished.
    def started(run):
        return events(store, run.run_id, "start")[0]["time"]

    def finished(run):
        return (store.run_dir(run.run_id) / "done.json").stat().st_mtime

    assert finished(data) <= started(base)
    assert all(finished(base) <= started(run) for run in runs)
    # While it ran, a second launch submitted nothing.
    code, out = array_sweep["again"]
    assert code == 0 and "0 run(s) to submit" in out, out
    assert set(array_sweep["states_during"].values()) <= {"pending", "running", "done"}
    code, out = array_sweep["waited"]
    assert code == 0 and out.strip().endswith("5 done"), out
    # After it finished, a launch submits nothing either.
    code, out = array_sweep["after"]
    assert code == 0 and "0 run(s) to submit" in out and "'done': 5" in out, out
    assert [len(jobs_of(store, r.run_id)) for r in sweep.runs] == [1] * 5
    code, out = array_sweep["collected"]
    assert code == 0 and "from 3 run(s) (3 finished)" in out, out
    df = pd.read_parquet(array_sweep["root"] / "results.parquet")
    finals = df[df.final]
    assert sorted(finals.run_id) == sorted(r.run_id for r in runs)
    assert (finals.status == "done").all() and (finals.loss > 0).all()
    assert sorted(finals.seed) == [0, 1, 2]
    assert (finals.tokens >= BUDGET).all() and (finals.budget_tokens == BUDGET).all()
    base_flops = json.loads((store.run_dir(base.run_id) / "done.json").read_text())["flops"]
    assert (finals.base_flops == base_flops).all() and (finals.base_run_id == base.run_id).all()
    for run in sweep.runs:  # each job imported the code snapshot of the launch
        start = events(store, run.run_id, "start")[0]
        assert start["code"].startswith(str(array_sweep["root"] / "code"))


def test_preemption_hard_requeue_and_time_limit_resume_exactly(array_sweep, tmp_path,
                                                               monkeypatch):
    ref_run = next(r for r in array_sweep["sweep"].runs if r.role == "run" and r.seed == 0)
    ref_dir = array_sweep["store"].run_dir(ref_run.run_id)
    # The same data and base LM as the array's runs.
    dataset = ref_run.config["data"]["dir"]
    per_size = {"t12k": {"config": {"model": {"base": ref_run.config["model"]["base"]}}}}
    ref_steps = json.loads((ref_dir / "done.json").read_text())["steps"]
    # Jobs inherit the submitting environment: steps are paced (see slow_steps/) so that
    # every run is still training when its signal lands, on a fast machine too.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(Path(__file__).parent / "slow_steps"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    # name: (seconds per step at least, signal the test sends once the run trains)
    cases = {
        # USR2 as a scheduler sends on preemption: checkpoint, requeue, resume.
        "usr2": (0.3, ["scancel", "--signal=USR2"]),
        # scontrol requeue: no USR2; the job is killed and starts again.
        "hard": (0.3, ["scontrol", "requeue"]),
        # The time limit: lowered to 1 minute while the job trains, so Slurm sends the
        # batch script's USR2 (30 s before the limit) ~30 s into the job, then raised again
        # for the requeued job. 16 steps of 2.5 s outlast that on any machine.
        "limit": (2.5, ["scontrol", "update", "TimeLimit=1"]),
    }
    runs = {}
    try:
        for name, (pace, _) in cases.items():
            path = write_sweep(tmp_path / f"{name}.yaml", dataset,
                               grid={"sizes": ["t12k"], "budgets": [{"tokens": BUDGET}],
                                     "seeds": [0]},
                               launch={"parallelism": 2, "signal_delay_s": 30},
                               per_size=per_size)
            sweep = load_sweep(path, root=tmp_path / name)
            # The same config as the array's run of seed 0.
            assert sweep.runs[0].config == ref_run.config
            monkeypatch.setenv("POLAR_TEST_MIN_STEP_S", str(pace))
            code, out = polar_sweep("launch", path, "--root", sweep.root, "--executor", "slurm")
            assert code == 0, out
            runs[name] = (sweep, sweep.runs[0], Store(sweep.root))
        # Signals go out as soon as a run's metrics show it training (past its first
        # periodic checkpoint at step 5 for the hard requeue), with most steps to go
        # (steps last >= 0.3 s here).
        sent, raised, checked = {}, False, 0.0
        deadline = time.time() + 480
        while time.time() < deadline:
            for name, (_, command) in cases.items():
                _, run, store = runs[name]
                at = 5 if name == "hard" else 1
                if name not in sent and last_step(store, run.run_id) >= at:
                    job = jobs_of(store, run.run_id)[-1]
                    target = [f"JobId={job}"] if name == "limit" else [job]
                    subprocess.run([*command, *target], check=True)
                    sent[name] = last_step(store, run.run_id)
            _, run, store = runs["limit"]
            if not raised and events(store, run.run_id, "requeue"):
                job = jobs_of(store, run.run_id)[-1]
                subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"],
                               check=True)
                raised = True
            if time.time() - checked > 2:
                checked = time.time()
                states = [store.status(sweep)[0].state for sweep, _, store in runs.values()]
                if all(s == "done" for s in states) or "failed" in states:
                    break
            time.sleep(0.1)
    finally:
        for sweep, _, store in runs.values():
            polar_sweep("cancel", sweep.path, "--root", store.root)
    for name, (sweep, _, store) in runs.items():
        st = store.status(sweep)[0]
        assert st.state == "done", (name, st.state, st.reason, st.log)
    assert set(sent) == set(cases) and max(sent.values()) < ref_steps, (sent, ref_steps)
    for name, (_, run, store) in runs.items():
        starts = events(store, run.run_id, "start")
        assert len(starts) >= 2 and starts[-1]["restart"] >= 1, (name, starts)
        assert_same_metrics(store.run_dir(run.run_id) / "metrics.jsonl",
                            ref_dir / "metrics.jsonl")
    # USR2: the loop saved a checkpoint, then submitit's handler requeued the job.
    _, run, store = runs["usr2"]
    assert len(events(store, run.run_id, "requeue")) >= 1
    # Hard requeue: submitit never checkpointed; the run resumed from its own checkpoint.
    _, run, store = runs["hard"]
    assert events(store, run.run_id, "requeue") == []
    # Time limit: Slurm's USR2 reached a job that submitit saw as timed out; requeued once.
    sweep, run, store = runs["limit"]
    assert len(events(store, run.run_id, "requeue")) == 1
    assert "this job is timed-out" in store.status(sweep)[0].log.read_text()


def test_cancel_then_launch_submits_again(tmp_path):
    require_slurm()
    path = write_sweep(tmp_path / "s.yaml", tmp_path / "no-data-needed-before-it-starts")
    root = tmp_path / "root"
    sweep = load_sweep(path, root=root)
    store = Store(root)
    try:
        code, out = polar_sweep("launch", path, "--root", root, "--executor", "slurm")
        assert code == 0, out
        job = jobs_of(store, sweep.runs[0].run_id)[0]
        code, out = polar_sweep("cancel", path, "--root", root)
        assert code == 0 and f"cancelled {sweep.runs[0].run_id}" in out and "1 run(s)" in out
        assert [s.state for s in store.status(sweep)] == ["cancelled"]
        deadline = time.time() + 60  # Slurm's own record follows
        while time.time() < deadline:
            sacct = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job],
                                   capture_output=True, text=True).stdout.split()
            if sacct and sacct[0].startswith("CANCELLED"):
                break
            time.sleep(1)
        assert sacct and sacct[0].startswith("CANCELLED"), sacct
        # A cancelled run is not done: the next launch submits it again.
        code, out = polar_sweep("launch", path, "--root", root, "--executor", "slurm")
        assert code == 0 and "1 run(s) to submit" in out, out
        assert len(jobs_of(store, sweep.runs[0].run_id)) == 2
    finally:
        polar_sweep("cancel", path, "--root", root)
