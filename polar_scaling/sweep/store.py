"""The sweep root on disk, and the status of every run read from it and from the scheduler.

    ROOT/runs/RUN_ID/        the run directory (polar_scaling.rundir) plus:
        launch.yaml          the stage config the run is started with (written before submit)
        sweep.json           what the sweep knows of the run: its grid point and submissions
        sweep_events.jsonl   starts and requeues, appended by the job itself
        logs/                links to the scheduler logs of each submission
    ROOT/jobs/STAMP/         submitit folders (pickles, logs), one per launch
    ROOT/scripts/            the rendered batch scripts (of launches and of --dry-run)
    ROOT/code/HASH/          the code snapshot jobs import (PYTHONPATH)
    ROOT/results.{parquet,csv}

A run's state comes first from its directory (``done.json`` means done, whatever the
scheduler says), then from the scheduler's view of its latest submission.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from polar_scaling.rundir import atomic_write, read_jsonl
from polar_scaling.sweep.spec import RunSpec, Sweep

# Scheduler states of a job that will still run (Slurm names; local and debug map to them).
LIVE_PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                "RESIZING", "SUSPENDED", "PREEMPTED"}
LIVE_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}
# waiting: never submitted, and a file another sweep writes (RunSpec.needs) is not there yet
STATES = ("done", "running", "pending", "failed", "cancelled", "blocked", "waiting", "new",
          "unknown")


class SweepError(RuntimeError):
    """A sweep cannot be launched, inspected or collected; the message says why and what to do."""


@dataclass
class RunStatus:
    run: RunSpec
    state: str  # one of STATES
    job_id: str | None = None
    executor: str | None = None
    reason: str | None = None  # why failed, blocked or cancelled
    log: Path | None = None  # the stderr log of the latest submission
    failures: int = 0  # submissions that ended without finishing the run (cancels excluded)
    step: int | None = None
    tokens: float | None = None  # tokens trained so far (rft: rollout tokens)
    flops: float | None = None
    loss: float | None = None  # latest held-out eval loss
    restarts: int = 0  # requeues and restarts of the latest submission

    @property
    def progress(self) -> float | None:
        """Fraction of the run's budget done (1.0 when done)."""
        if self.state == "done":
            return 1.0
        steps = (self.run.config.get("budget") or {}).get("steps")
        if self.run.stage == "rft" and steps and self.step is not None:  # a budget in steps
            return min(1.0, self.step / steps)
        if self.tokens is None or not self.run.tokens:
            return None
        if self.run.budget and self.run.budget.startswith("flop") and self.flops is not None:
            return min(1.0, self.flops / self.run.flops)
        return min(1.0, self.tokens / self.run.tokens)


class Store:
    """Paths and records under one sweep root."""

    def __init__(self, root: Path):
        self.root = Path(root)

    runs_dir = property(lambda self: self.root / "runs")
    jobs_dir = property(lambda self: self.root / "jobs")
    scripts_dir = property(lambda self: self.root / "scripts")
    code_dir = property(lambda self: self.root / "code")
    lock_path = property(lambda self: self.root / ".launch.lock")
    local_launcher_path = property(lambda self: self.root / "local_launcher.json")

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    # ----------------------------------------------------------------- writing

    def check_writable(self) -> None:
        """Create the root, or raise SweepError saying why it cannot be written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise SweepError(f"sweep root {self.root} is not writable ({e.strerror or e}); "
                             f"set `root:` in the sweep file or pass --root") from None

    def prepare_run(self, run: RunSpec, resolved: dict | None) -> None:
        """Write the run's directory before it is submitted: launch.yaml, the config the
        stage is started with (``resolved``, every default filled in, when the stage exposes
        its config class; else the sweep's config of the run), and sweep.json."""
        path = self.run_dir(run.run_id)
        path.mkdir(parents=True, exist_ok=True)
        launch = path / "launch.yaml"
        text = yaml.safe_dump(resolved if resolved is not None else run.config, sort_keys=False)
        if not launch.exists() or launch.read_text() != text:
            atomic_write(launch, text)
        record = self.read_record(run.run_id)
        record.update({"run_id": run.run_id, "name": run.name, "stage": run.stage,
                       "role": run.role, "size": run.size, "n_params": run.n_params,
                       "seed": run.seed, "budget": run.budget, "tokens": run.tokens,
                       "flops": run.flops, "deps": list(run.deps), "flags": list(run.flags),
                       "workdir": run.workdir})
        record.setdefault("submissions", [])
        self.write_record(run.run_id, record)

    def read_record(self, run_id: str) -> dict:
        path = self.run_dir(run_id) / "sweep.json"
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return {}

    def write_record(self, run_id: str, record: dict) -> None:
        atomic_write(self.run_dir(run_id) / "sweep.json", json.dumps(record, indent=1))

    def add_submission(self, run_id: str, submission: dict) -> None:
        """Record a submission (job id, executor, submitit folder) and link its logs."""
        record = self.read_record(run_id)
        record.setdefault("submissions", []).append(submission)
        self.write_record(run_id, record)
        if submission.get("folder") and submission.get("job_id"):
            logs = self.run_dir(run_id) / "logs"
            logs.mkdir(exist_ok=True)
            for kind, path in log_paths(submission).items():
                link = logs / f"{submission['job_id']}.{kind}"
                if not link.is_symlink():
                    try:
                        link.symlink_to(path)
                    except OSError:  # a file system without links: the record has the path
                        pass

    def update_submission(self, run_id: str, job_id: str, **fields) -> None:
        record = self.read_record(run_id)
        for sub in record.get("submissions", []):
            if sub.get("job_id") == job_id:
                sub.update(fields)
        self.write_record(run_id, record)

    def snapshot_code(self) -> Path:
        """Copy the ``polar_scaling`` package to ROOT/code/HASH (once per distinct source) and
        return the folder to put on PYTHONPATH: queued jobs then run the code launched."""
        import hashlib

        import polar_scaling

        src = Path(polar_scaling.__file__).parent
        files = sorted(p for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                       and p.suffix in (".py", ".json", ".yaml", ".txt", ".sbatch"))
        digest = hashlib.sha256()
        for p in files:
            digest.update(str(p.relative_to(src)).encode())
            digest.update(p.read_bytes())
        dest = self.code_dir / digest.hexdigest()[:12]
        if not (dest / "COMPLETE").is_file():
            tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            for p in files:
                target = tmp / "polar_scaling" / p.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, target)
            (tmp / "COMPLETE").write_text("")
            if dest.exists():  # a launcher that died half-way left it
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        return dest

    # ----------------------------------------------------------------- reading

    def status(self, sweep: Sweep, probe: bool = True) -> list[RunStatus]:
        """The state of every run of ``sweep`` (one scheduler query for all of them).

        ``probe=False`` reads only the run directories (no sacct call).
        """
        records = {r.run_id: self.read_record(r.run_id) for r in sweep.runs}
        latest = {rid: (rec.get("submissions") or [None])[-1] for rid, rec in records.items()}
        slurm_ids = [s["job_id"] for s in latest.values() if s and s.get("executor") == "slurm"]
        slurm = slurm_states(slurm_ids) if probe and slurm_ids else None
        launcher = self.local_launcher()
        out: dict[str, RunStatus] = {}
        for run in sweep.ordered():
            out[run.run_id] = self._status_of(run, records[run.run_id], latest[run.run_id],
                                              slurm, launcher, probe)
        for run in sweep.ordered():  # a part of a finished dataset has nothing left to do
            if run.role == "data-part" and any(out[r.run_id].state == "done" for r in sweep.runs
                                               if r.role == "data" and run.run_id in r.deps):
                out[run.run_id].state = "done"
        for run in sweep.ordered():  # a run waiting on a failed dependency will never start
            st = out[run.run_id]
            if st.state in ("new", "pending", "cancelled"):
                bad = [d for d in run.deps if out[d].state in ("failed", "blocked")]
                if bad:
                    st.state = "blocked"
                    st.reason = f"dependency {bad[0]} {out[bad[0]].state}"
            missing = [n for n in run.needs if not Path(n).is_file()]
            if st.state == "new" and missing:  # another sweep's run has not finished yet
                st.state, st.reason = "waiting", f"waiting for {missing[0]}"
        return [out[r.run_id] for r in sweep.runs]

    def local_launcher(self) -> dict | None:
        """The record of a live local launcher of this sweep, or None."""
        path = self.local_launcher_path
        if not path.is_file():
            return None
        try:
            info = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        return info if pid_alive(info.get("pid"), info.get("pid_start")) else None

    def _status_of(self, run, record, sub, slurm, launcher, probe) -> RunStatus:
        path = self.run_dir(run.run_id)
        st = RunStatus(run=run, state="new")
        subs = record.get("submissions") or []
        st.failures = sum(1 for s in subs if not s.get("cancelled"))
        metrics = read_jsonl(path / "metrics.jsonl") if (path / "metrics.jsonl").exists() else []
        for row in metrics:
            st.step, st.flops = row.get("step"), row.get("flops")
            st.tokens = row.get("tokens", row.get("rollout_tokens"))  # rft: rollout tokens
            if "eval_loss" in row:
                st.loss = row["eval_loss"]
        if sub is not None:
            st.job_id, st.executor = sub.get("job_id"), sub.get("executor")
            st.log = log_paths(sub).get("err") if sub.get("folder") else None
            if sub.get("log"):
                st.log = Path(sub["log"])
            events = read_jsonl(path / "sweep_events.jsonl")
            st.restarts = max(0, sum(1 for e in events if e.get("event") == "start"
                                     and e.get("job_id") == st.job_id) - 1)
        if (path / "done.json").is_file():
            st.state, st.failures = "done", 0
            return st
        if sub is None:
            if launcher and run.run_id in launcher.get("runs", []):
                st.state = "pending"
            return st
        if sub.get("cancelled"):
            st.state, st.reason = "cancelled", "cancelled by polar-sweep cancel"
            return st
        executor = sub.get("executor")
        if executor == "debug":
            st.state = "failed"
            st.reason = sub.get("reason") or "the run ended without done.json"
            return st
        if executor == "local":
            alive = pid_alive(sub.get("job_id"), sub.get("pid_start"))
            if alive:
                st.state = "running"
                st.failures -= 1
                return st
            st.state, st.reason = "failed", failure_reason(sub, None)
            return st
        if slurm is None:
            st.state = "unknown"
            st.reason = ("not asked" if not probe else
                         "sacct did not answer (is Slurm up? is accounting running?)")
            return st
        info = slurm.get(sub["job_id"])
        if info is None:
            age = time.time() - sub.get("epoch", 0)
            if age < 120:  # accounting lags a fresh submission by a moment
                st.state = "pending"
                st.failures -= 1
            else:
                st.state = "failed"
                st.reason = f"Slurm has no record of job {sub['job_id']} (state purged?)"
            return st
        state = info.get("State", "UNKNOWN").split()[0].upper()
        if state in LIVE_PENDING:
            st.state = "pending"
            st.failures -= 1
        elif state in LIVE_RUNNING:
            st.state = "running"
            st.failures -= 1
        elif state == "CANCELLED" and info.get("_dependency_never"):
            st.state, st.reason = "blocked", "a dependency failed"
        else:
            st.state, st.reason = "failed", failure_reason(sub, info)
        return st


def log_paths(submission: dict) -> dict[str, Path]:
    """The stdout and stderr logs of task 0 of a submission."""
    from submitit.core.utils import JobPaths

    paths = JobPaths(submission["folder"], job_id=submission["job_id"], task_id=0)
    return {"out": paths.stdout, "err": paths.stderr}


def failure_reason(submission: dict, info: dict | None) -> str:
    """One line saying why a submission ended without finishing its run."""
    from submitit.core.utils import JobPaths, pickle_load

    parts = []
    if info is not None:
        state = info.get("State", "UNKNOWN")
        parts.append(state if state not in ("COMPLETED",) else "job ended without done.json")
        if info.get("ExitCode") and info["ExitCode"] not in ("0:0",):
            parts.append(f"exit {info['ExitCode']}")
    result = JobPaths(submission["folder"], job_id=submission["job_id"], task_id=0).result_pickle
    line = None
    if result.is_file():
        try:
            outcome, payload = pickle_load(result)
        except Exception:  # a result torn by a kill: fall back to the log
            outcome, payload = None, None
        if outcome == "error":
            line = _last_line(str(payload))
    if line is None:
        err = log_paths(submission)["err"]
        if err.is_file():
            line = _last_error_line(err)
    if line:
        parts.append(line)
    return ": ".join(parts) if parts else "ended without done.json"


def _last_line(text: str) -> str | None:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else None


def _last_error_line(path: Path) -> str | None:
    """The last line of a log that looks like an error (else its last line)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 20000))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()
                     if ln.strip()]
    except OSError:
        return None
    for ln in reversed(lines):
        if "Error" in ln or "error:" in ln or "Killed" in ln or "CANCELLED" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else None


def slurm_states(job_ids: list[str]) -> dict[str, dict] | None:
    """``{job_id: {State, ExitCode, Reason}}`` from one ``sacct`` call; None if sacct fails.

    Array tasks are asked for by their array's id; pending tasks reported as ranges
    (``12_[3-5%2]``) are expanded.
    """
    from submitit.slurm.slurm import SlurmInfoWatcher

    ids = sorted({str(j).split("_")[0] for j in job_ids})
    cmd = ["sacct", "-o", "JobID,State,ExitCode,Reason", "--parsable2", "-j", ",".join(ids)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    out = proc.stdout
    info = SlurmInfoWatcher().read_info(out)
    for rec in info.values():
        if "DependencyNeverSatisfied" in rec.get("Reason", ""):
            rec["_dependency_never"] = True
    return info


def process_start(pid) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot), or None if it is gone.
    Recorded with a pid, it tells the process apart from a later one given the same pid."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError, TypeError):
        return None
    # Field 22; the command name (field 2) may hold spaces, so split after its ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    state = fields[0]
    return None if state in ("Z", "X") else fields[19]


def pid_alive(pid, start: str | None) -> bool:
    """Whether the process recorded as (``pid``, ``start``) still runs."""
    current = process_start(pid)
    return current is not None and (start is None or current == start)


def now() -> dict:
    """Submission time fields: readable and epoch."""
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "epoch": time.time()}
