"""``polar-sweep``: launch, watch, collect and cancel a sweep of runs described by a YAML file.

    polar-sweep launch SWEEP.yaml [key=value ...] [--executor slurm|local|debug] [--wait]
    polar-sweep dry-run SWEEP.yaml          # = launch --dry-run: the plan and batch scripts
    polar-sweep status SWEEP.yaml [--watch] [--json]
    polar-sweep collect SWEEP.yaml          # ROOT/results.parquet and ROOT/results.csv
    polar-sweep cancel SWEEP.yaml [--only GLOB]
    polar-sweep logs SWEEP.yaml RUN [-n 40]

``key=value`` arguments override the sweep file (e.g. ``grid.seeds=[0]``).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import sys
import time
from pathlib import Path

from polar_scaling.config import ConfigError
from polar_scaling.rundir import RunDirError
from polar_scaling.sweep.spec import Sweep, load_sweep
from polar_scaling.sweep.store import Store, SweepError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polar-sweep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p):
        p.add_argument("sweep", type=Path, help="the sweep YAML file")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="overrides of the sweep file")
        p.add_argument("--root", type=Path, help="sweep root (default: the file's `root`)")
        p.add_argument("--only", action="append", metavar="GLOB",
                       help="only runs whose id matches (repeatable; dependencies follow)")

    for name, help_text in (("launch", "submit the runs that are not done, pending or running"),
                            ("dry-run", "print the plan and write the batch scripts only")):
        p = sub.add_parser(name, help=help_text)
        common(p)
        p.add_argument("--executor", choices=("slurm", "local", "debug"),
                       help="default: slurm where `sbatch` exists, else local")
        p.add_argument("--retry-failed", action="store_true",
                       help="submit failed runs again even past launch.max_attempts")
        p.add_argument("--poll", type=float, default=None, help="seconds between status polls")
        if name == "launch":
            p.add_argument("--dry-run", action="store_true",
                           help="print every run and write the batch scripts; submit nothing")
            p.add_argument("--wait", action="store_true",
                           help="show live progress until every run has ended")
    p = sub.add_parser("status", help="a table of runs: state, progress, failure reason, log")
    common(p)
    p.add_argument("--watch", action="store_true", help="refresh until every run has ended")
    p.add_argument("--json", action="store_true", help="one JSON object per run")
    p.add_argument("--poll", type=float, default=None)
    p = sub.add_parser("collect", help="write ROOT/results.parquet and ROOT/results.csv")
    common(p)
    p = sub.add_parser("cancel", help="cancel pending and running jobs (runs keep checkpoints)")
    common(p)
    p = sub.add_parser("logs", help="print the end of a run's latest log")
    p.add_argument("sweep", type=Path)
    p.add_argument("run", help="run id (or a unique prefix)")
    p.add_argument("--root", type=Path)
    p.add_argument("-n", type=int, default=40, help="lines (default 40)")
    p.add_argument("--out", action="store_true", help="stdout log instead of stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, SweepError, RunDirError) as e:
        print(f"polar-sweep {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"polar-sweep {args.command}: interrupted", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- commands


def cmd_launch(args) -> int:
    from polar_scaling.sweep import launch as L
    from polar_scaling.sweep.spec import resolve_stage_config
    from polar_scaling.sweep.view import LiveView, plan_table

    sweep = _load(args)
    store = Store(sweep.root)
    store.check_writable()
    only = _select(sweep, args.only)
    if getattr(args, "dry_run", False) or args.command == "dry-run":
        plan = L.make_plan(sweep, store, args.retry_failed, only)
        for run in plan.submit:  # a bad config fails the dry run, as it would fail launch
            resolve_stage_config(run, str(sweep.path))
        scripts = L.dry_run_scripts(sweep, store, plan)
        actions = {r.run_id: "submit" for r in plan.submit}
        actions.update({rid: f"skip ({why})" for rid, why in plan.skip.items()})
        print(plan_table(_subset(sweep, only), actions))
        print(f"batch scripts ({len(scripts)}) written to {store.scripts_dir / 'dry-run'}; "
              f"nothing submitted")
        return 0
    executor = args.executor or L.default_executor()
    L.check_executor(executor)
    with L.launcher_lock(store) as held:
        if not held:
            print(f"another polar-sweep launch holds {store.lock_path} "
                  f"({_lock_owner(store)}); nothing submitted")
            return 0
        _write_lock_owner(store)
        plan = L.make_plan(sweep, store, args.retry_failed, only)
        for rid, why in plan.skip.items():
            if not why.startswith(("done", "running", "pending")):
                print(f"not submitting {rid}: {why}")
        skipped = {}
        for why in plan.skip.values():
            key = why.split(" ")[0].rstrip(":")
            skipped[key] = skipped.get(key, 0) + 1
        print(f"{sweep.spec.name}: {len(plan.submit)} run(s) to submit with executor "
              f"{executor}" + (f"; left alone: {skipped}" if skipped else "") + f" (root {store.root})")
        wait = getattr(args, "wait", False)
        waiting = [st for st in plan.statuses.values() if st.state == "waiting"
                   and (only is None or st.run.run_id in only)]
        if not plan.submit and not wait:
            return _exit_code(waiting)
        L.prepare(sweep, store, plan.submit)
        if executor == "slurm":
            if plan.submit:
                L.submit_slurm(sweep, store, plan, sys.stdout)
        elif executor == "local":
            view = LiveView() if wait else None
            L.run_local(sweep, store, plan, sys.stdout, view=view)
        else:
            L.run_debug(sweep, store, plan, sys.stdout)
    if executor == "slurm" and not wait:
        print(f"follow with: polar-sweep status {args.sweep}" + _root_arg(args))
        return _exit_code(waiting)
    if executor == "slurm":  # what this launch can see end: submitted or already queued
        live = {r.run_id for r in plan.submit} | {
            rid for rid, why in plan.skip.items() if why in ("running", "pending")}
        _wait(sweep, store, args.poll or 5.0, live & (_subset_ids(sweep, only) or live))
    statuses = store.status(sweep)
    statuses = [s for s in statuses if only is None or s.run.run_id in only]
    _print_final(statuses)
    return _exit_code(statuses)


def cmd_status(args) -> int:
    from polar_scaling.sweep.view import status_table

    sweep = _load(args)
    store = Store(sweep.root)
    only = _select(sweep, args.only)
    if args.watch:
        statuses = _wait(sweep, store, args.poll or 5.0, _subset_ids(sweep, only))
    else:
        statuses = store.status(sweep)
    statuses = [s for s in statuses if only is None or s.run.run_id in only]
    if args.json:
        for st in statuses:
            print(json.dumps({"run_id": st.run.run_id, "state": st.state, "job_id": st.job_id,
                              "executor": st.executor, "reason": st.reason,
                              "log": str(st.log) if st.log else None, "step": st.step,
                              "tokens": st.tokens, "loss": st.loss, "progress": st.progress,
                              "failures": st.failures, "restarts": st.restarts}))
        return 0
    print(status_table(statuses))
    return 0


def cmd_collect(args) -> int:
    from polar_scaling.sweep.collect import write_results

    sweep = _load(args)
    store = Store(sweep.root)
    statuses = store.status(sweep)
    df = write_results(sweep, store, statuses)
    runs = df["run_id"].nunique() if len(df) else 0
    finals = int(df["final"].sum()) if len(df) else 0
    print(f"{len(df)} rows from {runs} run(s) ({finals} finished) -> "
          f"{store.root / 'results.parquet'} and {store.root / 'results.csv'}")
    for st in statuses:
        if st.state in ("failed", "blocked"):
            print(f"  {st.run.run_id}: {st.state}: {st.reason}" + (f" (log {st.log})"
                                                                   if st.log else ""))
    return 0


def cmd_cancel(args) -> int:
    from polar_scaling.sweep.launch import cancel

    sweep = _load(args)
    n = cancel(sweep, Store(sweep.root), _select(sweep, args.only))
    print(f"{n} run(s) cancelled; `polar-sweep launch` resumes them from their checkpoints")
    return 0


def cmd_logs(args) -> int:
    from polar_scaling.sweep.store import log_paths

    sweep = load_sweep(args.sweep, root=args.root)
    store = Store(sweep.root)
    matches = [r for r in sweep.runs if r.run_id.startswith(args.run) or r.name == args.run]
    if len(matches) != 1:
        raise SweepError(f"{len(matches)} runs match {args.run!r}"
                         + (f": {', '.join(r.run_id for r in matches[:5])}" if matches else ""))
    subs = store.read_record(matches[0].run_id).get("submissions") or []
    if not subs:
        raise SweepError(f"{matches[0].run_id} was never submitted")
    sub = subs[-1]
    path = Path(sub["log"]) if sub.get("log") else log_paths(sub)["out" if args.out else "err"]
    print(f"==> {path}")
    if path.is_file():
        lines = path.read_text(errors="replace").splitlines()
        print("\n".join(lines[-args.n:]))
    return 0


COMMANDS = {"launch": cmd_launch, "dry-run": cmd_launch,
            "status": cmd_status, "collect": cmd_collect, "cancel": cmd_cancel, "logs": cmd_logs}


# --------------------------------------------------------------------------- helpers


def _load(args) -> Sweep:
    return load_sweep(args.sweep, args.overrides, root=args.root)


def _select(sweep: Sweep, patterns: list[str] | None) -> set[str] | None:
    if not patterns:
        return None
    chosen = {r.run_id for r in sweep.runs
              if any(fnmatch.fnmatch(r.run_id, p) or fnmatch.fnmatch(r.name, p)
                     for p in patterns)}
    if not chosen:
        raise SweepError(f"no run matches {', '.join(patterns)}")
    return chosen


def _subset(sweep: Sweep, only: set[str] | None) -> Sweep:
    if only is None:
        return sweep
    from polar_scaling.sweep.launch import _with_deps

    keep = _with_deps(sweep, only)
    return Sweep(spec=sweep.spec, path=sweep.path, root=sweep.root,
                 runs=[r for r in sweep.runs if r.run_id in keep])


def _subset_ids(sweep: Sweep, only: set[str] | None) -> set[str] | None:
    return None if only is None else {r.run_id for r in _subset(sweep, only).runs}


def _wait(sweep: Sweep, store: Store, poll_s: float, ids: set[str] | None):
    """Poll until every run (of ``ids``) has ended, showing the live view."""
    from polar_scaling.sweep.view import LiveView, is_finished

    view = LiveView()
    unknown_since = None
    while True:
        statuses = [s for s in store.status(sweep) if ids is None or s.run.run_id in ids]
        view.update(statuses)
        if is_finished(statuses):
            return statuses
        live = [s for s in statuses
                if s.state not in ("done", "failed", "cancelled", "blocked", "waiting")]
        if all(s.state == "unknown" for s in live):
            unknown_since = unknown_since or time.time()
            if time.time() - unknown_since > 120:
                print("the scheduler has not reported these jobs for 2 minutes; stopped "
                      "waiting (see `polar-sweep status`)", file=sys.stderr)
                return statuses
        else:
            unknown_since = None
        time.sleep(poll_s)


def _exit_code(statuses) -> int:
    """1: a run failed or is blocked; 3: runs wait for another sweep's runs, or their inputs
    arrived after this launch planned (never submitted); else 0."""
    if any(s.state in ("failed", "blocked") for s in statuses):
        return 1
    waiting = [s for s in statuses if s.state == "waiting"]
    if waiting:
        print(f"{len(waiting)} run(s) wait for another sweep's runs ({waiting[0].reason}); "
              f"launch again once they have finished", file=sys.stderr)
        return 3
    ready = [s for s in statuses if s.state == "new" and s.run.needs]
    if ready:
        print(f"{len(ready)} run(s) became ready while this launch ran (another sweep's runs "
              f"finished); launch again to submit them", file=sys.stderr)
        return 3
    return 0


def _print_final(statuses) -> None:
    from polar_scaling.sweep.view import status_table

    print(status_table(statuses))


def _lock_owner(store: Store) -> str:
    with contextlib.suppress(OSError):
        text = store.lock_path.read_text().strip()
        if text:
            return f"pid {text}"
    return "unknown pid"


def _write_lock_owner(store: Store) -> None:
    with open(store.lock_path, "w") as f:
        f.write(str(os.getpid()))


def _root_arg(args) -> str:
    return f" --root {args.root}" if args.root else ""


if __name__ == "__main__":
    sys.exit(main())
