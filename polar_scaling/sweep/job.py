"""The callable a sweep job runs: one stage of one run, resumable, requeued on preemption.

:class:`RunJob` is a submitit ``Checkpointable``. On the scheduler's USR2 (preemption, or the
time limit approaching) the training loop saves a checkpoint at the next step boundary and
hands the signal to submitit, which calls :meth:`RunJob.checkpoint` and requeues the job;
the requeued job calls the same RunJob, and the stage resumes from the run directory's
latest checkpoint. The number of requeues of one submission is bounded.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from submitit.helpers import Checkpointable, DelayedSubmission

from polar_scaling.rundir import atomic_write, read_jsonl

EVENTS = "sweep_events.jsonl"


class RunJob(Checkpointable):
    """Run ``stage`` on ``run_dir`` with the config in ``run_dir/launch.yaml``: the command
    line ``polar-train STAGE RUN_DIR/launch.yaml --run-dir WORKDIR FLAGS`` in this process.

    ``workdir`` (default ``run_dir``) is where the stage writes when that is not the run's own
    directory (a part of a dataset writes into the dataset); the run directory then gets the
    stage's summary as ``done.json`` once it returns.
    """

    def __init__(self, run_id: str, stage: str, run_dir: str, max_requeues: int = 10,
                 flags: tuple[str, ...] = (), workdir: str | None = None):
        self.run_id = run_id
        self.stage = stage
        self.run_dir = str(run_dir)
        self.max_requeues = max_requeues
        self.flags = tuple(flags)
        self.workdir = workdir

    @property
    def argv(self) -> list[str]:
        """The polar-train command line this job runs."""
        return [self.stage, str(Path(self.run_dir) / "launch.yaml"),
                "--run-dir", self.workdir or self.run_dir, *self.flags]

    def __call__(self) -> dict:
        import polar_scaling
        from polar_scaling.cli import build_parser, run_stage, split_config_args, stage_options

        # "code" shows which copy of the package the job imported (the launch's snapshot).
        self._event("start", restart=int(os.environ.get("SLURM_RESTART_COUNT", "0")),
                    host=socket.gethostname(), pid=os.getpid(),
                    code=str(Path(polar_scaling.__file__).parent), argv=self.argv)
        args = build_parser().parse_args(self.argv)
        config, overrides = split_config_args(args.args)
        summary = run_stage(args.stage, config, overrides, args.run_dir, **stage_options(args))
        if self.workdir and Path(self.workdir) != Path(self.run_dir) and _rank() == 0:
            atomic_write(Path(self.run_dir) / "done.json",
                         json.dumps(summary, indent=2, default=str))
        return summary

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission | None:
        """Called by submitit on USR2 (after the loop saved its checkpoint): requeue the same
        call, or refuse (None: the job ends as failed) past ``max_requeues``."""
        job = _job_id()
        done = sum(1 for e in read_jsonl(Path(self.run_dir) / EVENTS)
                   if e.get("event") == "requeue" and e.get("job_id") == job)
        if done >= self.max_requeues:
            self._event("requeue_limit", limit=self.max_requeues)
            return None
        self._event("requeue")
        return DelayedSubmission(self, *args, **kwargs)

    def _event(self, name: str, **fields) -> None:
        if _rank() != 0:
            return
        row = {"event": name, "job_id": _job_id(), "time": time.time(), **fields}
        with open(Path(self.run_dir) / EVENTS, "a") as f:
            f.write(json.dumps(row) + "\n")

    def __repr__(self) -> str:
        return f"RunJob({self.run_id}, {' '.join(self.argv)})"


def run_job(run, run_dir: Path, max_requeues: int) -> RunJob:
    """The job of ``run`` (a :class:`~polar_scaling.sweep.spec.RunSpec`)."""
    return RunJob(run.run_id, run.stage, str(run_dir), max_requeues, flags=run.flags,
                  workdir=run.workdir)


def _job_id() -> str | None:
    try:
        import submitit

        return submitit.JobEnvironment().job_id
    except Exception:  # not inside a submitit job (called directly)
        return None


def _rank() -> int:
    for key in ("SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID", "RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0
