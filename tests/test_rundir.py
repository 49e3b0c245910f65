"""Run directories: a config written by an older version, before a key existed."""

from __future__ import annotations

import os

import pytest
import yaml

from polar_scaling.config import default_dict, to_dict
from polar_scaling.pretrain import PretrainArgs
from polar_scaling.rundir import RunDir, RunDirError


def test_a_key_added_later_at_its_default_does_not_block_a_resume(tmp_path):
    args = to_dict(PretrainArgs())
    defaults = default_dict(PretrainArgs)
    run = RunDir(tmp_path / "run")
    run.init(args, "pretrain", defaults=defaults)
    # The run was written before engine.fused_kernels existed.
    old = yaml.safe_load(run.config_path.read_text())
    del old["engine"]["fused_kernels"]
    run.config_path.write_text(yaml.safe_dump(old))
    run.init(args, "pretrain", defaults=defaults)  # at its default: resumes
    changed = to_dict(PretrainArgs())
    changed["engine"]["fused_kernels"] = "compile"
    with pytest.raises(RunDirError, match=r"differs in: engine\.fused_kernels"):
        run.init(changed, "pretrain", defaults=defaults)
    # Without the defaults the old rule stands: any difference is refused.
    with pytest.raises(RunDirError, match=r"engine\.fused_kernels"):
        run.init(args, "pretrain")
    # A key the old config had with another value is still a different run.
    changed = to_dict(PretrainArgs())
    changed["seed"] = 3
    with pytest.raises(RunDirError, match="differs in: seed"):
        run.init(changed, "pretrain", defaults=defaults)
    assert yaml.safe_load(run.config_path.read_text()) == old  # never rewritten


def test_default_dict_equals_an_instance_and_skips_validation():
    from polar_scaling.finetune import FinetuneArgs

    assert default_dict(PretrainArgs) == to_dict(PretrainArgs())
    d = default_dict(FinetuneArgs)  # FinetuneArgs() itself refuses: no training file
    assert d["engine"]["fused_kernels"] == "auto" and "train" in d["data"]


def test_a_second_process_on_a_running_directory_is_refused(tmp_path):
    """The run's lock: while one process runs a directory, another is refused, naming the
    holder; the lock goes with the holder (also when it is killed)."""
    import subprocess
    import sys

    run = RunDir(tmp_path / "run")
    run.init({"a": 1}, "pretrain")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from polar_scaling.rundir import RunDir\n"
         f"with RunDir({str(run.path)!r}).exclusive():\n"
         "    print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "RANK": "0"})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=rf"in use by pid {holder.pid} on "):
            with run.exclusive():
                pass
    finally:
        holder.kill()
        holder.wait()
    with run.exclusive():  # the killed holder's lock is gone
        assert f"pid {os.getpid()} " in (run.path / ".lock").read_text()
    with run.exclusive():  # and released at the end of the block
        pass


def test_other_ranks_do_not_lock(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.init({"a": 1}, "pretrain")
    with run.exclusive():
        monkeypatch.setenv("RANK", "1")
        with run.exclusive():  # rank 1 of the same run shares the directory
            pass
