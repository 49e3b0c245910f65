"""Overhead of the sweep manager on a 500-run grid, against bare submitit submissions.

Times, for 10 ladder sizes x 10 budgets x 5 seeds = 500 runs:
  - expansion and validation: read the YAML, check it, expand the grid (derived settings,
    budgets, run ids), and check every run's config against the stage's config class;
  - dry run: plan (the status of every run), render the batch scripts, print the table;
and, as the reference, 500 bare ``submitit`` submissions in debug mode (``DebugExecutor``:
pickling-free, nothing runs). Prints the times and their ratio. Aim: expansion and
validation well under 2 s.

    python benchmarks/sweep_overhead.py [--runs-per-size 50]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import yaml

SIZES = ["t12k", "t25k", "t50k", "t100k", "t200k", "t400k", "t800k", "t1.6m", "t3.2m", "t5m"]


def sweep_doc(budgets: int, seeds: int) -> dict:
    return {
        "name": "bench",
        "stage": "pretrain",
        "data": {"dir": "/data/world"},
        "config": {"schedule": {"eval_points": 12, "progress": False}},
        "grid": {"sizes": SIZES,
                 "budgets": [{"tokens": float(f"{2.5e5 * 1.5 ** i:.3g}")} for i in range(budgets)],
                 "seeds": list(range(seeds))},
        "derived": {
            "optim.lr": {"rule": "power", "base": 1e-3, "exponent": -0.25, "ref_params": 1e5},
            "batch.size": {"rule": "power", "base": 32, "exponent": 0.1, "ref_params": 1e5,
                           "multiple_of": 8},
        },
        "resources": {"cpus_per_task": 1, "time": 30},
        "per_size": {"t5m": {"resources": {"cpus_per_task": 2}}},
    }


def noop() -> None:
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()

    import submitit

    from polar_scaling.sweep.launch import dry_run_scripts, make_plan
    from polar_scaling.sweep.spec import load_sweep, resolve_stage_config, stage_args_class
    from polar_scaling.sweep.store import Store
    from polar_scaling.sweep.view import plan_table

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "bench.yaml"
        path.write_text(yaml.safe_dump(sweep_doc(args.budgets, args.seeds), sort_keys=False))

        t0 = time.perf_counter()
        stage_args_class("pretrain")  # one-time import of the stage module (torch)
        t_import = time.perf_counter() - t0

        t0 = time.perf_counter()
        sweep = load_sweep(path, root=tmp / "root")
        t_expand = time.perf_counter() - t0
        t0 = time.perf_counter()
        for run in sweep.runs:
            resolve_stage_config(run, str(path))
        t_validate = time.perf_counter() - t0
        n = len(sweep.runs)

        t0 = time.perf_counter()
        store = Store(sweep.root)
        store.check_writable()
        plan = make_plan(sweep, store)
        scripts = dry_run_scripts(sweep, store, plan)
        with contextlib.redirect_stdout(io.StringIO()):
            print(plan_table(sweep, {r.run_id: "submit" for r in plan.submit}))
        t_dry = time.perf_counter() - t0

        executor = submitit.DebugExecutor(tmp / "submitit")
        t0 = time.perf_counter()
        for _ in range(n):
            executor.submit(noop)
        t_submitit = time.perf_counter() - t0

    ours = t_expand + t_validate + t_dry
    print(f"runs: {n}; batch scripts: {len(scripts)}")
    print(f"expand (read, check, derive, ids):  {t_expand:7.3f} s")
    print(f"validate (stage config of each run): {t_validate:7.3f} s"
          f"   (+ {t_import:.2f} s one-time import of the stage module)")
    print(f"expand + validate:                  {t_expand + t_validate:7.3f} s   (aim < 2 s)")
    print(f"dry run (status, scripts, table):   {t_dry:7.3f} s")
    print(f"all of the above:                   {ours:7.3f} s")
    print(f"{n} bare submitit debug submissions: {t_submitit:7.3f} s")
    print(f"ratio (ours / bare submitit):       {ours / t_submitit:7.2f}")


if __name__ == "__main__":
    main()
