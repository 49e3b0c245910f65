"""Batch scripts: runs grouped into Slurm jobs (arrays) and rendered from the template.

Runs that share a stage, resources and dependencies become one job array (``--array=0-N%P``
with the sweep's parallelism cap); a group of one is a plain job. The script text comes from
``slurm/templates/polar_job.sbatch`` (or the sweep's ``launch.template``), so what
``--dry-run`` writes is what ``launch`` submits.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from polar_scaling.sweep.spec import JobResources, RunSpec, Sweep

PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@dataclass
class JobGroup:
    """Runs submitted as one job (or one array): same stage, resources and dependencies."""

    name: str
    stage: str
    role: str
    resources: JobResources
    runs: list[RunSpec]
    dependency: tuple[str, ...] = ()  # job ids (or, in a dry run, names) it waits for

    @property
    def is_array(self) -> bool:
        return len(self.runs) > 1


def repo_dir() -> Path:
    import polar_scaling

    return Path(polar_scaling.__file__).resolve().parent.parent


def default_template() -> Path:
    return repo_dir() / "slurm" / "templates" / "polar_job.sbatch"


def torch_extensions_dir() -> str:
    """Where DeepSpeed caches its built ops: $TORCH_EXTENSIONS_DIR, else the repo's .cache."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(repo_dir() / ".cache" / "torch_extensions")


def group_runs(runs: list[RunSpec], deps_of: dict[str, tuple[str, ...]]) -> list[JobGroup]:
    """Runs grouped by (role, stage, resources, dependency job ids), in first-seen order.

    ``deps_of[run_id]`` lists the job ids the run must wait for (already resolved).
    """
    groups: dict[tuple, JobGroup] = {}
    for run in runs:
        key = (run.role, run.stage, run.resources, deps_of.get(run.run_id, ()))
        if key not in groups:
            groups[key] = JobGroup(name="", stage=run.stage, role=run.role,
                                   resources=run.resources, runs=[],
                                   dependency=deps_of.get(run.run_id, ()))
        groups[key].runs.append(run)
    out = list(groups.values())
    used: dict[str, int] = {}
    for g in out:
        sizes = sorted({r.size for r in g.runs if r.size})
        base = g.stage if len(sizes) != 1 else f"{g.stage}-{sizes[0]}"
        if g.role == "data-part":
            base = f"{g.stage}-parts"
        elif g.role == "data" and any(r.flags for r in g.runs):
            base = f"{g.stage}-finalize"
        used[base] = used.get(base, 0) + 1
        g.name = base if used[base] == 1 else f"{base}-{used[base]}"
    return out


def render_script(sweep: Sweep, group: JobGroup, folder: Path, code_dir: str,
                  python: str | None = None, template: Path | None = None) -> str:
    """The sbatch script of ``group``, its submitit files under ``folder``."""
    spec, res = sweep.spec, group.resources
    folder = str(folder)
    task_pattern = "%A_%a" if group.is_array else "%j"
    options = []
    if res.gpus_per_node:
        options.append(f"--gpus-per-node={res.gpus_per_node}")
    if res.mem_gb:
        options.append(f"--mem={_mem(res.mem_gb)}")
    for name in ("partition", "account", "qos", "constraint"):
        value = getattr(res, name)
        if value:
            options.append(f"--{name}={shlex.quote(str(value))}")
    if res.exclusive:
        options.append("--exclusive")
    if group.is_array:
        n = len(group.runs)
        options.append(f"--array=0-{n - 1}%{min(n, spec.launch.parallelism)}")
    if group.dependency:
        options.append(f"--dependency=afterok:{':'.join(group.dependency)}")
        # A dependency that failed cancels this job instead of leaving it pending forever.
        options.append("--kill-on-invalid-dep=yes")
    runs = ", ".join(r.name for r in group.runs[:3]) + (" ..." if len(group.runs) > 3 else "")
    values = {
        "sweep": spec.name,
        "description": f"{len(group.runs)} {group.stage} run(s): {runs}",
        "job_name": f"{spec.name}-{group.name}",
        "nodes": res.nodes,
        "tasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task,
        "time": res.slurm_time,
        "signal_delay_s": spec.launch.signal_delay_s,
        "stdout": f"{folder}/{task_pattern}_0_log.out",
        "stderr": f"{folder}/{task_pattern}_0_log.err",
        "sbatch_options": "\n".join(f"#SBATCH {o}" for o in options),
        "code_dir": shlex.quote(code_dir),
        "torch_extensions_dir": shlex.quote(torch_extensions_dir()),
        "environment": "\n".join(f"export {k}={shlex.quote(str(v))}"
                                 for k, v in spec.launch.env.items()),
        "setup": "\n".join(spec.launch.setup),
        "task_stdout": shlex.quote(f"{folder}/{task_pattern}_%t_log.out"),
        "task_stderr": shlex.quote(f"{folder}/{task_pattern}_%t_log.err"),
        "python": python or spec.launch.python or shlex.quote(sys.executable),
        "folder": shlex.quote(folder),
    }
    return fill(Path(template or default_template()).read_text(), values)


def fill(template: str, values: dict) -> str:
    """Replace ``{{name}}`` placeholders; a line that is only a placeholder rendering to
    nothing is dropped. An unknown placeholder is a ValueError naming it."""
    missing = sorted(set(PLACEHOLDER.findall(template)) - set(values))
    if missing:
        raise ValueError(f"batch template has unknown placeholder(s): {', '.join(missing)}")
    out = []
    for line in template.splitlines():
        rendered = PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), line)
        if not rendered.strip() and PLACEHOLDER.fullmatch(line.strip()):
            continue
        out.append(rendered)
    return "\n".join(out) + "\n"


def _mem(gb: float) -> str:
    return f"{int(gb)}G" if float(gb).is_integer() else f"{int(gb * 1024)}M"
