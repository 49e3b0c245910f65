"""Submit a sweep's runs through submitit: Slurm job arrays, local processes, or in-process.

``launch`` is idempotent: it submits only runs that are neither done nor pending nor running
(a changed config is a new run id, so it is a new run), after their dependencies (the data
run, then a size's base LM) with Slurm ``afterok`` dependencies. A run that failed is
submitted again until it has failed ``launch.max_attempts`` times.

Executors:
- ``slurm``: every group of runs is one sbatch job (array), rendered from the template; the
  cluster schedules, so ``launch`` returns once all is submitted.
- ``local``: this machine is the scheduler: ``launch`` starts submitit local jobs (at most
  ``launch.parallelism`` at once, dependencies first) and stays until they end. A second
  launcher of the same root finds the lock held and submits nothing.
- ``debug``: each run in this process, one after another (submitit's DebugExecutor).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import submitit
from submitit.slurm.slurm import SlurmExecutor, SlurmJob

from polar_scaling.sweep.job import run_job
from polar_scaling.sweep.render import JobGroup, group_runs, render_script, torch_extensions_dir
from polar_scaling.sweep.spec import ROLES, RunSpec, Sweep, resolve_stage_config
from polar_scaling.sweep.store import (
    RunStatus,
    Store,
    SweepError,
    now,
    process_start,
)

EXECUTORS = ("slurm", "local", "debug")


def default_executor() -> str:
    """``slurm`` where ``sbatch`` is on PATH, else ``local``."""
    return "slurm" if shutil.which("sbatch") else "local"


def check_executor(name: str) -> None:
    if name not in EXECUTORS:
        raise SweepError(f"unknown executor {name!r} (known: {', '.join(EXECUTORS)})")
    if name == "slurm":
        missing = [c for c in ("sbatch", "srun", "sacct") if shutil.which(c) is None]
        if missing:
            raise SweepError(f"--executor slurm needs {', '.join(missing)} on PATH, and "
                             f"`{missing[0]}` was not found (is Slurm installed and on PATH "
                             f"here?); use --executor local to run on this machine")


@dataclass
class Plan:
    """What a launch will do: the runs to submit, and why each other run is left alone."""

    submit: list[RunSpec] = field(default_factory=list)
    skip: dict[str, str] = field(default_factory=dict)  # run id -> reason
    statuses: dict[str, RunStatus] = field(default_factory=dict)


def make_plan(sweep: Sweep, store: Store, retry_failed: bool = False,
              only: set[str] | None = None) -> Plan:
    """Decide which runs to submit. ``only``: run ids to consider (their dependencies are
    considered too)."""
    statuses = {s.run.run_id: s for s in store.status(sweep)}
    wanted = _with_deps(sweep, only) if only is not None else set(statuses)
    plan = Plan(statuses=statuses)
    will_run: set[str] = set()
    for run in sweep.ordered():
        if run.run_id not in wanted:
            continue
        st = statuses[run.run_id]
        if st.state in ("done", "running", "pending"):
            plan.skip[run.run_id] = st.state
            continue
        if st.state == "unknown":
            plan.skip[run.run_id] = f"unknown state ({st.reason})"
            continue
        if (st.state in ("failed", "blocked") and st.failures >= sweep.spec.launch.max_attempts
                and not retry_failed):
            plan.skip[run.run_id] = (f"failed {st.failures} times (launch.max_attempts); "
                                     f"see {st.log}; --retry-failed submits it again")
            continue
        bad = [d for d in run.deps if d not in will_run
               and statuses[d].state not in ("done", "running", "pending")]
        if bad:
            plan.skip[run.run_id] = f"blocked: dependency {bad[0]} is {statuses[bad[0]].state}"
            continue
        if st.state == "waiting":  # another sweep's run (an rft grid's RM) has not finished
            plan.skip[run.run_id] = (f"{st.reason} (another sweep's run: launch that sweep, "
                                     f"then this one again)")
            continue
        plan.submit.append(run)
        will_run.add(run.run_id)
    return plan


def prepare(sweep: Sweep, store: Store, runs: list[RunSpec]) -> None:
    """Check every run's config against its stage and write the run directories (the resolved
    config included) before anything is submitted."""
    resolved = {}
    for run in runs:
        resolved[run.run_id] = resolve_stage_config(run, str(sweep.path))
    for run in runs:
        store.prepare_run(run, resolved[run.run_id])


# --------------------------------------------------------------------------- slurm


class TemplateSlurmExecutor(SlurmExecutor):
    """submitit's Slurm executor with the batch script rendered from the project template."""

    def __init__(self, folder: Path, render, time_min: int, max_num_timeout: int,
                 python: str | None = None):
        super().__init__(folder, max_num_timeout=max_num_timeout, python=python)
        self.parameters["time"] = time_min  # submitit's timeout accounting reads it
        self._render = render  # (array: bool) -> script text
        self.scripts: list[str] = []

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        text = self._render(self.parameters.get("map_count") is not None)
        self.scripts.append(text)
        return text

    def _internal_process_submissions(self, delayed_submissions):
        if len(delayed_submissions) == 1:
            return super()._internal_process_submissions(delayed_submissions)
        # As SlurmExecutor's array path, but keeping this class (and its template).
        from submitit.core import utils

        folder = utils.JobPaths.get_first_id_independent_folder(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        pickle_paths = []
        for d in delayed_submissions:
            pickle_path = folder / f"{uuid.uuid4().hex}.pkl"
            d.set_timeout(self.parameters["time"], self.max_num_timeout)
            d.dump(pickle_path)
            pickle_paths.append(pickle_path)
        n = len(delayed_submissions)
        self.parameters["map_count"] = n
        try:
            first = self._submit_command(self._submitit_command_str)
        finally:
            self.parameters.pop("map_count", None)
        jobs = [SlurmJob(folder=self.folder, job_id=f"{first.job_id}_{a}", tasks=[0])
                for a in range(n)]
        for job, pickle_path in zip(jobs, pickle_paths, strict=True):
            job.paths.move_temporary_file(pickle_path, "submitted_pickle")
        return jobs


def submit_slurm(sweep: Sweep, store: Store, plan: Plan, out) -> dict[str, str]:
    """Submit the plan's runs as sbatch jobs/arrays; returns {run_id: job_id}."""
    spec = sweep.spec
    folder = store.jobs_dir / _stamp()
    code = str(store.snapshot_code())
    job_of = {rid: st.job_id for rid, st in plan.statuses.items()
              if st.state in ("running", "pending") and st.job_id}
    submitted: dict[str, str] = {}
    for role in ROLES:
        runs = [r for r in plan.submit if r.role == role]
        deps_of = {r.run_id: tuple(job_of[d] for d in r.deps if d in job_of) for r in runs}
        for group in group_runs(runs, deps_of):
            def render(array: bool, group=group):
                assert array == group.is_array
                return render_script(sweep, group, folder, code, template=_template(sweep))
            ex = TemplateSlurmExecutor(folder, render, group.resources.time_min,
                                       spec.launch.max_timeouts, python=spec.launch.python)
            calls = [run_job(r, store.run_dir(r.run_id), spec.launch.max_requeues)
                     for r in group.runs]
            try:
                jobs = ex.submit_array(calls) if group.is_array else [ex.submit(calls[0])]
            except Exception as e:  # sbatch refused: name the group and show its answer
                raise SweepError(f"sbatch refused job {group.name}: {str(e).strip()[:2000]}") \
                    from None
            _save_script(store, group, ex.scripts[-1], jobs[0].job_id.split("_")[0])
            for run, job in zip(group.runs, jobs, strict=True):
                job_of[run.run_id] = submitted[run.run_id] = job.job_id
                store.add_submission(run.run_id, {
                    "executor": "slurm", "job_id": job.job_id, "folder": str(folder),
                    "group": group.name, "dependency": list(group.dependency), **now()})
            array = f" (array of {len(jobs)})" if group.is_array else ""
            print(f"submitted {group.name}: job {jobs[0].job_id.split('_')[0]}{array}", file=out)
    return submitted


def dry_run_scripts(sweep: Sweep, store: Store, plan: Plan) -> list[Path]:
    """Render the batch scripts ``launch`` would submit, without submitting; returns their
    paths (ROOT/scripts/dry-run/). Dependencies on jobs not yet submitted are named
    ``<group>`` placeholders."""
    folder = store.jobs_dir / "dry-run"
    code = str(store.code_dir / "SNAPSHOT")
    target = store.scripts_dir / "dry-run"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    job_of = {rid: st.job_id for rid, st in plan.statuses.items()
              if st.state in ("running", "pending") and st.job_id}
    paths = []
    for role in ROLES:
        runs = [r for r in plan.submit if r.role == role]
        deps_of = {r.run_id: tuple(job_of[d] for d in r.deps if d in job_of) for r in runs}
        for group in group_runs(runs, deps_of):
            text = render_script(sweep, group, folder, code, template=_template(sweep))
            path = target / f"{group.name}.sbatch"
            path.write_text(text)
            paths.append(path)
            for i, run in enumerate(group.runs):
                job_of[run.run_id] = f"<{group.name}" + (f"_{i}>" if group.is_array else ">")
    return paths


def _save_script(store: Store, group: JobGroup, text: str, job_id: str) -> None:
    store.scripts_dir.mkdir(parents=True, exist_ok=True)
    (store.scripts_dir / f"{job_id}-{group.name}.sbatch").write_text(text)


def _template(sweep: Sweep) -> Path | None:
    t = sweep.spec.launch.template
    return Path(t) if t else None


# --------------------------------------------------------------------------- local


@contextlib.contextmanager
def launcher_lock(store: Store):
    """Hold ROOT/.launch.lock for the duration; yields False (and holds nothing) when another
    launcher holds it."""
    store.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(store.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class _Stop(Exception):
    pass


def run_local(sweep: Sweep, store: Store, plan: Plan, out, view=None,
              poll_s: float = 0.5) -> dict[str, str]:
    """Run the plan on this machine (at most ``launch.parallelism`` at once), dependencies
    first; returns {run_id: final state}. Stops cleanly on SIGINT/SIGTERM: running jobs get
    SIGTERM (they checkpoint), and relaunching resumes them."""
    spec = sweep.spec
    code = str(store.snapshot_code())
    folder = store.jobs_dir / _stamp()
    pending = list(plan.submit)
    running: dict[str, submitit.local.local.LocalJob] = {}
    final: dict[str, str] = {}
    state_of = {rid: st.state for rid, st in plan.statuses.items()}
    info = {"pid": os.getpid(), "pid_start": process_start(os.getpid()),
            "runs": [r.run_id for r in pending], **now()}
    store.local_launcher_path.write_text(json.dumps(info))
    previous = {}

    def stop(signum, frame):
        raise _Stop(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread
            previous[sig] = signal.signal(sig, stop)
    try:
        while pending or running:
            for rid, job in list(running.items()):
                if job.done():
                    del running[rid]
                    final[rid] = state_of[rid] = _local_outcome(store, rid, job)
                    if view is None:
                        print(f"{rid}: {final[rid]}", file=out, flush=True)
            for run in list(pending):
                dep_states = [state_of.get(d) for d in run.deps]
                if any(s in ("failed", "blocked", "cancelled") for s in dep_states):
                    pending.remove(run)
                    final[run.run_id] = state_of[run.run_id] = "blocked"
                    continue
                if len(running) >= spec.launch.parallelism or any(
                        s != "done" for s in dep_states):
                    continue
                pending.remove(run)
                running[run.run_id] = _start_local(sweep, store, run, folder, code)
                state_of[run.run_id] = "running"
            if view is not None:
                view.update(store.status(sweep, probe=False))
            if pending and not running:
                for run in pending:  # only runs waiting on deps that never finish
                    final[run.run_id] = state_of[run.run_id] = "blocked"
                break
            time.sleep(poll_s)
    except _Stop as e:
        print(f"\n{e}: stopping {len(running)} running job(s); they save a checkpoint and a "
              f"new launch resumes them", file=out)
        for job in running.values():
            with contextlib.suppress(OSError):
                job._process.send_signal(signal.SIGTERM)
        deadline = time.time() + 60
        while any(not j.done() for j in running.values()) and time.time() < deadline:
            time.sleep(0.2)
        raise KeyboardInterrupt from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        with contextlib.suppress(FileNotFoundError):
            store.local_launcher_path.unlink()
    return final


def _start_local(sweep: Sweep, store: Store, run: RunSpec, folder: Path, code: str):
    spec = sweep.spec
    if run.resources.world_size > 1:
        raise SweepError(f"run {run.run_id} asks for {run.resources.world_size} ranks; the "
                         f"local executor runs one process per run (use Slurm)")
    ex = submitit.LocalExecutor(folder, max_num_timeout=spec.launch.max_timeouts,
                                python=spec.launch.python)
    setup = [f"export PYTHONPATH={_q(code)}${{PYTHONPATH:+:$PYTHONPATH}}",
             "export PYTHONSAFEPATH=1",  # no working directory (a checkout?) before it
             f"export TORCH_EXTENSIONS_DIR={_q(torch_extensions_dir())}"]
    setup += [f"export {k}={_q(str(v))}" for k, v in spec.launch.env.items()]
    setup += list(spec.launch.setup)
    ex.update_parameters(timeout_min=run.resources.time_min,
                         signal_delay_s=min(spec.launch.signal_delay_s,
                                            run.resources.time_min * 30),
                         setup=setup)
    job = ex.submit(run_job(run, store.run_dir(run.run_id), spec.launch.max_requeues))
    store.add_submission(run.run_id, {"executor": "local", "job_id": job.job_id,
                                      "pid_start": process_start(job.job_id),
                                      "folder": str(folder), **now()})
    return job


def _local_outcome(store: Store, run_id: str, job) -> str:
    if (store.run_dir(run_id) / "done.json").is_file():
        return "done"
    return "failed"


# --------------------------------------------------------------------------- debug


def run_debug(sweep: Sweep, store: Store, plan: Plan, out) -> dict[str, str]:
    """Run the plan in this process, one run after another; returns {run_id: final state}."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())
    folder = store.jobs_dir / _stamp()
    state_of = {rid: st.state for rid, st in plan.statuses.items()}
    final = {}
    for run in plan.submit:
        if any(state_of.get(d) != "done" for d in run.deps):
            final[run.run_id] = state_of[run.run_id] = "blocked"
            print(f"{run.run_id}: blocked (a dependency did not finish)", file=out)
            continue
        ex = submitit.DebugExecutor(folder)
        job = ex.submit(run_job(run, store.run_dir(run.run_id), sweep.spec.launch.max_requeues))
        log = store.run_dir(run.run_id) / "logs" / f"debug-{_stamp()}.err"
        store.add_submission(run.run_id, {"executor": "debug", "job_id": job.job_id,
                                          "log": str(log), **now()})
        print(f"{run.run_id}: running in this process", file=out)
        error = job.exception()
        done = (store.run_dir(run.run_id) / "done.json").is_file()
        state = "done" if done and error is None else "failed"
        fields = {"state": state}
        if error is not None:
            log.parent.mkdir(exist_ok=True)
            log.write_text("".join(traceback.format_exception(error)))
            fields["reason"] = f"{type(error).__name__}: {error}"[:300]
        store.update_submission(run.run_id, job.job_id, **fields)
        final[run.run_id] = state_of[run.run_id] = state
        print(f"{run.run_id}: {state}" + (f" ({fields['reason']}; log {log})"
                                          if state == "failed" else ""), file=out)
    return final


# --------------------------------------------------------------------------- cancel


def cancel(sweep: Sweep, store: Store, only: set[str] | None = None, out=None) -> int:
    """Cancel the sweep's pending and running jobs (and a live local launcher); returns how
    many runs were cancelled. A cancelled run saves a checkpoint and a launch resumes it."""
    import subprocess

    out = out or sys.stdout
    statuses = [s for s in store.status(sweep)
                if s.state in ("pending", "running") and (only is None or s.run.run_id in only)]
    launcher = store.local_launcher()
    if launcher and only is None:
        with contextlib.suppress(OSError):
            os.kill(launcher["pid"], signal.SIGTERM)
    slurm_ids = [s.job_id for s in statuses if s.executor == "slurm" and s.job_id]
    if slurm_ids:
        subprocess.run(["scancel", *slurm_ids], check=False)
    for s in statuses:
        if s.executor == "local" and s.job_id:
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(s.job_id), signal.SIGTERM)
        if s.job_id:
            store.update_submission(s.run.run_id, s.job_id, cancelled=True)
        print(f"cancelled {s.run.run_id} ({s.state}, job {s.job_id})", file=out)
    return len(statuses)


# --------------------------------------------------------------------------- helpers


def _with_deps(sweep: Sweep, only: set[str]) -> set[str]:
    by_id = sweep.by_id
    out, todo = set(), list(only)
    while todo:
        rid = todo.pop()
        if rid in out:
            continue
        out.add(rid)
        todo.extend(by_id[rid].deps)
    return out


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}-{uuid.uuid4().hex[:4]}"


def _q(text: str) -> str:
    import shlex

    return shlex.quote(text)

