"""End to end without Slurm: the local executor runs the real stages in dependency order (the
data, then pre-training runs on it); a failing run is reported with its log and does not stop
the others; launching again submits nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pandas as pd
from sweep_helpers import REPO, polar_sweep, write_sweep

from polar_scaling.sweep.spec import load_sweep
from polar_scaling.sweep.store import Store


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def submissions(store, run_id):
    return store.read_record(run_id).get("submissions", [])


def test_local_sweep_end_to_end(tmp_path):
    # The data first; then two runs on it: 4,000 tokens trains, 1e7 tokens is more than the
    # dataset holds and fails. (The Slurm tests add a base LM between them.)
    path = write_sweep(tmp_path / "s.yaml", None, base=None,
                       grid={"sizes": ["t12k"], "budgets": [{"tokens": 4000}, {"tokens": 1e7}],
                             "seeds": [0]},
                       launch={"parallelism": 2, "max_attempts": 1})
    root = tmp_path / "root"
    sweep = load_sweep(path, root=root)
    store = Store(root)
    data, good, bad = sweep.runs
    assert (data.stage, good.deps, bad.deps) == ("generate", (data.run_id,), (data.run_id,))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(
        [sys.executable, "-m", "polar_scaling.sweep.cli", "launch", str(path), "--root",
         str(root), "--executor", "local"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=env)
    try:
        wait_for(lambda: submissions(store, data.run_id), 120, "the data run to start")
        # Dependencies first: nothing else starts before the data exists.
        assert not any(submissions(store, r.run_id) for r in (good, bad))
        # While the first launcher runs them, a second launch submits nothing.
        code, out = polar_sweep("launch", path, "--root", root, "--executor", "local")
        assert code == 0 and "nothing submitted" in out, out
        states = [s.state for s in store.status(sweep)]
        assert states == ["running", "pending", "pending"], states
        out, _ = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 1, out  # one run failed
    st = {s.run.run_id: s for s in store.status(sweep)}
    assert st[good.run_id].state == "done"
    failed = st[bad.run_id]
    assert failed.state == "failed"
    assert "needs more data than the dataset holds" in failed.reason
    assert failed.log.is_file() and "needs more data" in failed.log.read_text()
    assert f"log: {failed.log}" in out
    # Jobs ran the code snapshot taken at launch, not the checkout.
    start = json.loads((store.run_dir(good.run_id) / "sweep_events.jsonl").read_text()
                       .splitlines()[0])
    assert start["code"].startswith(str(root / "code"))
    # Launching a finished sweep submits nothing (the failed run is past max_attempts).
    code, out = polar_sweep("launch", path, "--root", root, "--executor", "local")
    assert code == 0, out
    assert "0 run(s) to submit" in out
    assert f"not submitting {bad.run_id}: failed 1 times" in out
    assert [len(submissions(store, r.run_id)) for r in sweep.runs] == [1, 1, 1]
    # Each stage started after the runs it needs had finished.
    def started(run):
        return json.loads((store.run_dir(run.run_id) / "sweep_events.jsonl").read_text()
                          .splitlines()[0])["time"]

    def finished(run):
        return (store.run_dir(run.run_id) / "done.json").stat().st_mtime

    assert finished(data) <= started(good) and finished(data) <= started(bad)
    code, out = polar_sweep("collect", path, "--root", root)
    assert code == 0, out
    df = pd.read_parquet(root / "results.parquet")
    assert set(df.run_id) == {good.run_id}
    assert df.final.sum() == 1
    final = df[df.final].iloc[0]
    done = json.loads((store.run_dir(good.run_id) / "done.json").read_text())
    assert final["loss"] == done["final_eval"]["eval_loss"]
    assert final["flops"] == done["flops"] and final["tokens"] == done["tokens"]
    assert (final["params"], final["non_embedding_params"]) == (done["params"], 13440)
    assert final["base_run_id"] is None and math.isnan(final["base_flops"])
    # A changed config is a new run beside the old one, not an overwrite.
    changed = load_sweep(path, ["config.optim.lr=0.002"], root=root)
    assert changed.runs[0].run_id != good.run_id
    assert [s.state for s in store.status(changed)] == ["done", "new", "new"]


def test_debug_executor_reports_a_failure_and_goes_on(tmp_path):
    # Both runs fail at once (no dataset there); each failure is reported with its log.
    path = write_sweep(tmp_path / "s.yaml", tmp_path / "no-such-dataset",
                       grid={"sizes": ["t12k"], "budgets": [{"tokens": 4000}],
                             "seeds": [0, 1]})
    code, out = polar_sweep("launch", path, "--root", tmp_path / "root", "--executor", "debug")
    assert code == 1
    sweep = load_sweep(path, root=tmp_path / "root")
    statuses = Store(sweep.root).status(sweep)
    assert [s.state for s in statuses] == ["failed", "failed"]
    for st in statuses:
        assert "StageError: data.dir" in st.reason and "is not a trajectory dataset" in st.reason
        assert st.log.is_file() and "is not a trajectory dataset" in st.log.read_text()
        assert f"log {st.log}" in out
