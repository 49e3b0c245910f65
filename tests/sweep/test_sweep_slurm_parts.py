"""The dataset of a sweep written by a job array of parts and a finalize job, on the local
single-node Slurm (slurm/local/start.sh): the chain parts -> finalize -> base LM -> run, the
data equal to a single process's, idempotent launches, and a part task killed mid-way then
launched again. These tests fail when Slurm is down (POLAR_SKIP_SLURM=1 skips them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from sweep_helpers import DATASET, polar_sweep, read_rows, require_slurm, write_sweep

from polar_scaling.config import from_dict
from polar_scaling.data_generate import GenerateArgs, generate
from polar_scaling.sweep.spec import load_sweep
from polar_scaling.sweep.store import Store

pytestmark = pytest.mark.slurm

# 5 shards (train 3, heldout_prompts 1, heldout_policies 1) in 2 parts: {0, 2, 4} and {1, 3}.
PARTS_DATASET = {**DATASET, "shard_prompts": 40}


def parts_sweep(tmp_path: Path, name: str, **sections) -> Path:
    return write_sweep(tmp_path / f"{name}.yaml", None,
                       data={"generate": PARTS_DATASET, "jobs": 2, "resources": {"time": 10}},
                       **sections)


def jobs_of(store, run_id):
    return [s["job_id"] for s in store.read_record(run_id).get("submissions", [])]


def started(store, run):
    return [e["time"] for e in read_rows(store.run_dir(run.run_id) / "sweep_events.jsonl")
            if e["event"] == "start"]


def finished(store, run):
    return (store.run_dir(run.run_id) / "done.json").stat().st_mtime


def script(store, job_id, group):
    return (store.scripts_dir / f"{job_id.split('_')[0]}-{group}.sbatch").read_text().splitlines()


def without_timing(manifest: dict) -> dict:
    return {**manifest, "shards": [{k: v for k, v in s.items() if k != "seconds"}
                                   for s in manifest["shards"]]}


def dataset_files(path: Path) -> dict[str, bytes]:
    """Shards, tokenizer and config by relative path (part records and timings left out)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.parts[len(path.parts)] in ("shards", "tokenizer", "config.yaml")}


def dataset_state(path: Path) -> dict[str, bytes]:
    """Every file of the dataset but the sweep's own records of the run (sweep.json, ...)
    and the run's lock (which names the last process to hold it)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name not in ("sweep.json", "sweep_events.jsonl", ".lock")
            and p.parts[len(path.parts)] != "logs"}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The same dataset written by one `generate` in this process."""
    path = tmp_path_factory.mktemp("single") / "data"
    generate(from_dict(GenerateArgs, PARTS_DATASET), path)
    return path


def assert_same_dataset(data_dir: Path, reference: Path) -> None:
    assert dataset_files(data_dir) == dataset_files(reference)  # byte for byte
    assert len([p for p in dataset_files(data_dir) if p.startswith("shards/")]) == 5
    mine = json.loads((data_dir / "manifest.json").read_text())
    ref = json.loads((reference / "manifest.json").read_text())
    assert without_timing(mine) == without_timing(ref) and mine["complete"]


def test_parts_then_finalize_then_base_and_run(tmp_path, single_process):
    require_slurm()
    path = parts_sweep(tmp_path, "s")
    root = tmp_path / "root"
    sweep = load_sweep(path, root=root)
    store = Store(root)
    part0, part1, data, base, run = sweep.runs
    try:
        code, out = polar_sweep("launch", path, "--root", root, "--executor", "slurm")
        assert code == 0 and "5 run(s) to submit" in out, out
        code, again = polar_sweep("launch", path, "--root", root, "--executor", "slurm")
        waited = polar_sweep("status", path, "--root", root, "--watch", "--poll", "1")
    finally:
        polar_sweep("cancel", path, "--root", root)
    assert code == 0 and "0 run(s) to submit" in again, again
    code, text = waited
    assert code == 0 and text.strip().endswith("5 done"), text
    # One array of two part tasks, a finalize job after both, the rest after the finalize.
    (p0,), (p1,), (fin,), (lm,), (rm,) = (jobs_of(store, r.run_id) for r in sweep.runs)
    array = p0.split("_")[0]
    assert (p0, p1) == (f"{array}_0", f"{array}_1")
    assert f"submitted generate-parts: job {array} (array of 2)" in out
    assert "#SBATCH --array=0-1%2" in script(store, p0, "generate-parts")
    assert f"#SBATCH --dependency=afterok:{p0}:{p1}" in script(store, fin, "generate-finalize")
    assert f"#SBATCH --dependency=afterok:{fin}" in script(store, lm, "lm-t12k")
    assert f"#SBATCH --dependency=afterok:{fin}:{lm}" in script(store, rm, "pretrain-t12k")
    assert max(finished(store, p) for p in (part0, part1)) <= started(store, data)[0]
    assert finished(store, data) <= started(store, base)[0]
    assert finished(store, data) <= started(store, run)[0]
    # Each part task ran `polar-train generate ... --part I/2` on the dataset directory.
    data_dir = store.run_dir(data.run_id)
    for i, part in enumerate((part0, part1)):
        start = read_rows(store.run_dir(part.run_id) / "sweep_events.jsonl")[0]
        assert start["argv"][2:] == ["--run-dir", str(data_dir), "--part", f"{i}/2"]
        assert json.loads((store.run_dir(part.run_id) / "done.json").read_text())["part"] \
            == f"{i}/2"
    assert_same_dataset(data_dir, single_process)
    assert run.config["data"]["dir"] == str(data_dir)
    # Finished: another launch submits nothing.
    code, out = polar_sweep("launch", path, "--root", root, "--executor", "slurm")
    assert code == 0 and "0 run(s) to submit" in out and "'done': 5" in out, out
    # A corrupt shard of part 1 found by a finalize job: the job fails naming the part and
    # the shard, and nothing in the dataset is written or deleted.
    shard = data_dir / "shards" / "shard-00003.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    (data_dir / "done.json").unlink()
    before = dataset_state(data_dir)
    try:
        code, out = polar_sweep("launch", path, "--root", root, "--executor", "slurm")
        assert code == 0 and "1 run(s) to submit" in out, out  # only the finalize job
        polar_sweep("status", path, "--root", root, "--watch", "--poll", "1")
    finally:
        polar_sweep("cancel", path, "--root", root)
    st = next(s for s in store.status(sweep) if s.run.run_id == data.run_id)
    assert st.state == "failed" and st.job_id != fin, (st.state, st.reason)
    assert "StageError: cannot finalize: part 1/2: shards/shard-00003.parquet is corrupt" \
        in st.reason, st.reason
    sacct = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State,ExitCode", "-j", st.job_id],
                           capture_output=True, text=True).stdout.split()
    assert sacct and sacct[0].startswith("FAILED|") and not sacct[0].endswith("|0:0"), sacct
    assert dataset_state(data_dir) == before


def test_a_killed_part_task_is_submitted_again_and_the_data_is_the_same(
        tmp_path, single_process, monkeypatch):
    require_slurm()
    # Shards written at >= 3 s each, so part 1 (shards 1 and 3) is killed between them.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(Path(__file__).parent / "slow_steps"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("POLAR_TEST_MIN_SHARD_S", "3")
    path = parts_sweep(tmp_path, "k", base=None)
    root = tmp_path / "root"
    sweep = load_sweep(path, root=root)
    store = Store(root)
    part0, part1, data, run = sweep.runs
    data_dir = store.run_dir(data.run_id)
    record = data_dir / "parts" / "part-00001-of-00002.json"
    try:
        code, out = polar_sweep("launch", path, "--root", root, "--executor", "slurm")
        assert code == 0 and "4 run(s) to submit" in out, out
        deadline = time.time() + 180
        while time.time() < deadline:
            shards = json.loads(record.read_text())["shards"] if record.is_file() else []
            if shards:
                break
            time.sleep(0.2)
        assert [s["index"] for s in shards] == [1], shards
        first = data_dir / "shards" / "shard-00001.parquet"
        stamp = first.stat().st_mtime_ns
        # SIGKILL to the task's process, as the OOM killer or a crash would. (`scancel`
        # sends SIGTERM first, which submitit ignores, and the part may finish within KillWait.)
        start = read_rows(store.run_dir(part1.run_id) / "sweep_events.jsonl")[0]
        os.kill(start["pid"], signal.SIGKILL)
        code, out = polar_sweep("status", path, "--root", root, "--watch", "--poll", "1")
        states = {s.run.run_id: s for s in store.status(sweep)}
        assert states[part0.run_id].state == "done", out
        assert states[part1.run_id].state == "failed", out
        # Slurm cancelled the jobs waiting for it (afterok, --kill-on-invalid-dep).
        assert {states[r.run_id].state for r in (data, run)} <= {"blocked", "failed"}, out
        assert not json.loads(record.read_text())["complete"]
        assert not (data_dir / "manifest.json").exists()
        # Launched again: the killed part, then the finalize and the run; part 0 is done.
        monkeypatch.setenv("POLAR_TEST_MIN_SHARD_S", "0")
        code, out = polar_sweep("launch", path, "--root", root, "--executor", "slurm")
        assert code == 0 and "3 run(s) to submit" in out, out
        code, out = polar_sweep("status", path, "--root", root, "--watch", "--poll", "1")
        assert code == 0 and out.strip().endswith("4 done"), out
    finally:
        polar_sweep("cancel", path, "--root", root)
    assert [len(jobs_of(store, r.run_id)) for r in sweep.runs] == [1, 2, 2, 2]
    # The retried part kept the shard it had recorded and wrote the rest.
    assert first.stat().st_mtime_ns == stamp
    assert json.loads((store.run_dir(part1.run_id) / "done.json").read_text())[
        "shards_written_now"] == 1
    assert yaml.safe_load((data_dir / "config.yaml").read_text())["stage"] == "generate"
    assert_same_dataset(data_dir, single_process)
