"""Status and results from run directories written by the test (no job runs here), and the
launcher's clear errors on bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pandas as pd
import pytest
from submitit.core.utils import JobPaths, cloudpickle_dump
from sweep_helpers import polar_sweep, write_sweep

from polar_scaling.sweep.collect import COLUMNS, write_results
from polar_scaling.sweep.launch import check_executor, default_executor, make_plan
from polar_scaling.sweep.spec import load_sweep
from polar_scaling.sweep.store import Store, SweepError


def write_metrics(run_dir, rows):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def eval_row(step, loss, acc=0.6):
    return {"step": step, "tokens": 100 * step, "flops": 1e6 * step, "eval_loss": loss,
            "eval_accuracy": acc, "eval_heldout_policies_loss": loss + 0.01,
            "eval_heldout_policies_accuracy": acc - 0.05}


def train_row(step, loss):
    return {"step": step, "tokens": 100 * step, "flops": 1e6 * step, "train_loss": loss,
            "lr": 1e-3}


@pytest.fixture
def fabricated(tmp_path):
    """A 4-run sweep with base LMs, in every state: done, failed, running, never submitted."""
    path = write_sweep(tmp_path / "s.yaml", "/data/world",
                       grid={"sizes": ["t12k"], "budgets": [{"tokens": 1e4}],
                             "seeds": [0, 1, 2, 3]},
                       base={"budget": {"tokens": 5e4}})
    sweep = load_sweep(path, root=tmp_path / "root")
    store = Store(sweep.root)
    base, *runs = sweep.runs
    for run in sweep.runs:
        store.prepare_run(run, None)
    # The base LM finished with 3.5e9 FLOPs.
    write_metrics(store.run_dir(base.run_id), [train_row(10, 2.0)])
    (store.run_dir(base.run_id) / "done.json").write_text(json.dumps({"flops": 3.5e9}))
    # Run 0 finished.
    d0 = store.run_dir(runs[0].run_id)
    write_metrics(d0, [train_row(1, 0.7), eval_row(1, 0.69), train_row(5, 0.6), eval_row(5, 0.5)])
    (d0 / "done.json").write_text(json.dumps({"params": 21824, "non_embedding_params": 13440,
                                              "flops": 5e6}))
    # Run 1 failed in a local job: its result pickle holds the traceback.
    folder = tmp_path / "root" / "jobs" / "x"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    paths = JobPaths(folder, job_id=str(dead.pid), task_id=0)
    paths.folder.mkdir(parents=True)
    cloudpickle_dump(("error", "Traceback (most recent call last):\n  ...\n"
                      "polar_scaling.errors.StageError: a budget of 1e+07 tokens needs more "
                      "data\n"), paths.result_pickle)
    paths.stderr.write_text("some log\n")
    store.add_submission(runs[1].run_id, {"executor": "local", "job_id": str(dead.pid),
                                          "pid_start": "1", "folder": str(folder)})
    write_metrics(store.run_dir(runs[1].run_id), [train_row(1, 0.7), eval_row(1, 0.69)])
    # Run 2 runs: a live local process.
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    from polar_scaling.sweep.store import process_start

    store.add_submission(runs[2].run_id, {"executor": "local", "job_id": str(live.pid),
                                          "pid_start": process_start(live.pid),
                                          "folder": str(folder)})
    write_metrics(store.run_dir(runs[2].run_id), [train_row(1, 0.7), eval_row(1, 0.68),
                                                  train_row(5, 0.65)])
    yield path, sweep, store, base, runs, paths
    live.kill()
    live.wait()


def test_status_reads_each_state_with_reason_and_log(fabricated):
    path, sweep, store, base, runs, paths = fabricated
    st = {s.run.run_id: s for s in store.status(sweep)}
    assert st[base.run_id].state == "done"
    assert st[runs[0].run_id].state == "done" and st[runs[0].run_id].progress == 1.0
    failed = st[runs[1].run_id]
    assert failed.state == "failed" and failed.failures == 1
    assert failed.reason == ("polar_scaling.errors.StageError: a budget of 1e+07 tokens needs "
                             "more data")
    assert failed.log == paths.stderr and failed.log.is_file()
    running = st[runs[2].run_id]
    assert running.state == "running" and running.failures == 0
    assert running.tokens == 500 and running.progress == pytest.approx(0.05)
    assert running.loss == 0.68
    assert st[runs[3].run_id].state == "new"
    # The CLI table shows the failure's reason and log path under the run.
    code, out = polar_sweep("status", path, "--root", store.root)
    assert code == 0
    lines = out.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith(runs[1].run_id))
    assert "failed" in lines[i]
    assert lines[i + 1].strip().startswith("reason: polar_scaling.errors.StageError: a budget")
    assert lines[i + 2].strip() == f"log: {paths.stderr}"
    assert lines[-1] == "2 done, 1 running, 1 failed, 1 new"


def test_plan_submits_only_what_is_not_done_or_running(fabricated):
    path, sweep, store, base, runs, paths = fabricated
    plan = make_plan(sweep, store)
    assert [r.run_id for r in plan.submit] == [runs[1].run_id, runs[3].run_id]
    assert plan.skip == {base.run_id: "done", runs[0].run_id: "done", runs[2].run_id: "running"}
    # A run that failed launch.max_attempts times is left alone (and says why).
    capped = load_sweep(path, ["launch.max_attempts=1"], root=store.root)
    plan = make_plan(capped, store)
    assert [r.run_id for r in plan.submit] == [runs[3].run_id]
    assert plan.skip[runs[1].run_id].startswith("failed 1 times (launch.max_attempts); see ")
    assert [r.run_id for r in make_plan(capped, store, retry_failed=True).submit] == [
        runs[1].run_id, runs[3].run_id]


def test_collect_writes_curves_and_final_figures(fabricated):
    path, sweep, store, base, runs, paths = fabricated
    df = write_results(sweep, store)
    assert list(df.columns) == COLUMNS
    for table in (pd.read_parquet(store.root / "results.parquet"),
                  pd.read_csv(store.root / "results.csv")):
        assert len(table) == 2 + 1 + 1  # eval rows of runs 0, 1 and 2; run 3 has none
    r0 = df[df.run_id == runs[0].run_id].reset_index(drop=True)
    assert list(r0.step) == [1, 5] and list(r0.loss) == [0.69, 0.5]
    assert list(r0.final) == [False, True]
    assert list(r0.train_loss) == [0.7, 0.6]
    assert list(r0.heldout_policies_loss) == pytest.approx([0.70, 0.51])
    assert list(r0.heldout_policies_accuracy) == pytest.approx([0.55, 0.55])
    row = r0.iloc[1]
    assert (row["size"], row["params"], row["non_embedding_params"]) == ("t12k", 21824, 13440)
    assert (row["tokens"], row["flops"], row["accuracy"]) == (500, 5e6, 0.6)
    assert row["seed"] == 0 and row["batch"] == 4 and math.isnan(row["lr"])  # lr: not set
    assert row["base_flops"] == 3.5e9 and row["base_run_id"] == base.run_id
    assert row["budget_tokens"] == 1e4 and row["status"] == "done"
    # Unfinished runs keep their curves, never marked final.
    assert not df[df.run_id != runs[0].run_id].final.any()
    code, out = polar_sweep("collect", path, "--root", store.root)
    assert code == 0 and "4 rows from 3 run(s) (1 finished)" in out
    assert f"{runs[1].run_id}: failed: polar_scaling.errors.StageError" in out


def test_missing_sbatch_is_a_clear_error(tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(SweepError, match=r"--executor slurm needs sbatch, srun, sacct on PATH, "
                                         r"and `sbatch` was not found"):
        check_executor("slurm")
    assert default_executor() == "local"
    path = write_sweep(tmp_path / "s.yaml", "/data/world")
    code, out = polar_sweep("launch", path, "--root", tmp_path / "r", "--executor", "slurm")
    assert code == 2 and "use --executor local" in out
    assert not (tmp_path / "r" / "runs").exists()


def test_unwritable_root_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = write_sweep(tmp_path / "s.yaml", "/data/world", root=str(blocker / "sweep"))
    code, out = polar_sweep("launch", path, "--executor", "local")
    assert code == 2
    assert f"sweep root {blocker / 'sweep'} is not writable (Not a directory)" in out
    if os.geteuid() != 0:  # root writes through permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        code, out = polar_sweep("dry-run", path, "--root", ro / "x")
        assert code == 2 and "is not writable" in out


def test_bad_stage_config_fails_before_anything_is_written(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", "/data/world",
                       config={"schedule": {"eval_point": 3}})
    code, out = polar_sweep("launch", path, "--root", tmp_path / "r", "--executor", "local")
    assert code == 2
    assert "(run pretrain-t12k-tok4e3-s0): schedule.eval_point: unknown key" in out
    assert not list((tmp_path / "r").glob("runs/*/launch.yaml"))


def test_logs_prints_the_end_of_a_runs_latest_log(fabricated):
    path, sweep, store, base, runs, paths = fabricated
    paths.stderr.write_text("".join(f"line {i}\n" for i in range(100)))
    code, out = polar_sweep("logs", path, runs[1].run_id[:30], "--root", store.root, "-n", "3")
    assert code == 0
    assert out.splitlines() == [f"==> {paths.stderr}", "line 97", "line 98", "line 99"]
    code, out = polar_sweep("logs", path, runs[3].run_id, "--root", store.root)
    assert code == 2 and f"{runs[3].run_id} was never submitted" in out
    code, out = polar_sweep("logs", path, "pretrain-", "--root", store.root)
    assert code == 2 and "4 runs match 'pretrain-'" in out
