"""The shared training loop on the real DeepSpeed engine (gloo on CPU): resume, ZeRO, NaN."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from polar_scaling.dist_env import free_port
from polar_scaling.engine import lr_factor
from polar_scaling.model import RewardModel
from polar_scaling.rundir import read_jsonl
from polar_scaling.trainer import eval_steps

JOB = Path(__file__).parent / "jobs" / "toy_train.py"


def launch(run_dir, zero, steps, *extra, world=1):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    if world == 1:
        cmd = [sys.executable, str(JOB)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
               f"--master_port={free_port()}", str(JOB)]
    return subprocess.Popen(cmd + [str(run_dir), str(zero), str(steps), *map(str, extra)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def metric_rows(run_dir):
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def assert_same_metrics(a, b):
    assert len(a) == len(b) and len(a) > 0
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], abs=1e-6, rel=0), k


def kill_after_checkpoint(proc, run_dir, step):
    marker = Path(run_dir) / "checkpoints" / f"{step:010d}" / "COMPLETE"
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("world,zero", [(1, 0), (2, 2)])
def test_resume_after_sigkill_is_exact(tmp_path, world, zero):
    steps = 12
    ref = tmp_path / "ref"
    code, out = finish(launch(ref, zero, steps, world=world))
    assert code == 0, out
    cut = tmp_path / "cut"
    # Slow steps so the kill lands mid-run, after checkpoint 4 and before the end.
    proc = launch(cut, zero, steps, -1, 0.15, world=world)
    kill_after_checkpoint(proc, cut, 4)
    assert not (cut / "done.json").exists()
    code, out = finish(launch(cut, zero, steps, world=world))
    assert code == 0, out
    assert_same_metrics(metric_rows(ref), metric_rows(cut))
    a = RewardModel.from_pretrained(ref / "model").state_dict()
    b = RewardModel.from_pretrained(cut / "model").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_zero3_checkpoint_save_and_load(tmp_path):
    # ZeRO-3 patches torch globally, hence a subprocess (DEEPSPEED_NOTES.md).
    run = tmp_path / "z3"
    code, out = finish(launch(run, 3, 8))
    assert code == 0, out
    rows = metric_rows(run)
    # relaunching a finished run trains nothing and keeps the metrics
    code, out = finish(launch(run, 3, 8))
    assert code == 0 and metric_rows(run) == rows
    # a resume from the step-4 checkpoint (step-8 one removed) reproduces steps 5-8 exactly
    import shutil
    shutil.rmtree(run / "checkpoints" / "0000000008")
    (run / "done.json").unlink()
    code, out = finish(launch(run, 3, 8))
    assert code == 0, out
    assert_same_metrics(rows, metric_rows(run))
    model = RewardModel.from_pretrained(run / "model")
    assert model.score.weight.abs().sum() > 0


def test_damaged_checkpoint_is_skipped_with_warning(tmp_path):
    run = tmp_path / "dmg"
    code, out = finish(launch(run, 0, 8))
    assert code == 0, out
    rows = metric_rows(run)
    latest = run / "checkpoints" / "0000000008"
    for f in latest.rglob("*.pt"):
        f.write_bytes(b"garbage")
    (run / "done.json").unlink()
    code, out = finish(launch(run, 0, 8))
    assert code == 0, out
    assert "skipping damaged checkpoint" in out
    assert_same_metrics(rows, metric_rows(run))


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
    run = tmp_path / "nan"
    code, out = finish(launch(run, 0, 12, 6))
    assert code != 0
    assert "non-finite training loss" in out and "step 7" in out and "checkpoint is step 4" in out
    assert (run / "checkpoints" / "0000000004" / "COMPLETE").exists()
    assert not (run / "done.json").exists()
    assert max(r["step"] for r in metric_rows(run)) == 6


def test_eval_schedule_is_log_spaced_and_ends_at_last_step():
    steps = sorted(eval_steps(1000, 8, 0.01))
    assert steps[0] == 10 and steps[-1] == 1000
    ratios = [b / a for a, b in zip(steps, steps[1:], strict=False)]
    assert max(ratios) / min(ratios) < 1.2  # geometric spacing
    assert eval_steps(3, 16, 0.01) <= {1, 2, 3}


def test_lr_schedule_warmup_then_cosine_to_floor():
    total = 100
    f = [lr_factor(s, total, 0.03, 0.1) for s in range(total)]
    assert f[0] == pytest.approx(1 / 3) and f[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[2:], f[3:], strict=False))
    assert f[-1] == pytest.approx(0.1, abs=1e-3)


def test_metrics_have_required_keys(tmp_path):
    run = tmp_path / "m"
    code, out = finish(launch(run, 1, 4))
    assert code == 0, out
    rows = metric_rows(run)
    train_rows = [r for r in rows if "train_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert [r["tokens"] for r in train_rows] == [768, 1536, 2304, 3072]
    assert [r["flops"] for r in train_rows] == [1000, 3000, 6000, 10000]
    done = json.loads((run / "done.json").read_text())
    assert done["steps"] == 4 and done["tokens"] == 3072
    assert (run / "ds_config.json").is_file()
