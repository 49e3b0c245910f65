"""Sweep files: the YAML schema, its validation, and the expansion of a grid into runs.

A sweep file defines a ladder rather than listing it (as OLMo's model ladder does): ladder
sizes × budgets × seeds (× any extra axes) give the grid points, and settings such as the
learning rate or batch size are *derived* from each size's non-embedding parameter count N.
Every grid point becomes a :class:`RunSpec` whose id is a readable name plus a hash of the
resolved stage config, so the same point always maps to the same run directory and a changed
config is a new run. Everything here is pure (no files written, nothing submitted).

Schema (every key but ``name`` optional; docs/sweeps.md has the long form)::

    name: tiny                      # job names; default root runs/NAME
    root: runs/tiny                 # ROOT; relative to the current directory; $VARS expanded
    stage: pretrain                 # pretrain | lm | finetune | evaluate | rft | generate
    config: {...}                   # the stage config shared by every run (polar-train YAML)
    grid:
      sizes: [t25k, t50k]           # ladder names -> model.size
      budgets: [{tokens: 2e6}, {flops: 1e12}, {tokens_per_param: 20}]   # -> budget
      seeds: [0, 1]                 # -> seed
      axes: {optim.lr: [1e-3, 3e-3]}   # any other config key -> list of values
    derived:                        # config keys as functions of N (see Rule)
      optim.lr: {rule: power, base: 1e-3, exponent: -0.25, ref_params: 1e5}
    resources: {nodes: 1, gpus_per_node: 0, time: 30, partition: .., zero_stage: ..}
    per_size: {7B: {resources: {nodes: 2, gpus_per_node: 8}, config: {...}}}
    data: {generate: {...}, jobs: 1}  or  {dir: PATH}   # a `generate` run every run needs
    base: {config: {...}, budget: {tokens_per_param: 20}}   # a base LM per size (`lm` runs)
    launch: {parallelism: 8, max_attempts: 3, max_requeues: 10, signal_delay_s: 120, ...}
    estimate: {seq_len: 256, gpu_flops_per_s: 4e14, cpu_flops_per_s: 5e10}

Precedence of one run's config: ``config`` < ``derived`` < ``per_size.SIZE.config`` < extra
``axes`` < size, budget and seed of the grid point < links to the data and base runs.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal

from polar_scaling.config import (
    ConfigError,
    apply_overrides,
    from_dict,
    merge,
    read_yaml,
    to_dict,
)
from polar_scaling.rundir import safe_name
from polar_scaling.sizes import SIZES, ModelSize, flops_per_token, get_size, non_embedding_params

STAGES = ("pretrain", "lm", "finetune", "evaluate", "rft", "generate")
# Kinds of runs, in dependency order: parts of the dataset, the dataset (or its finalize
# step), a base LM per size, the grid points.
ROLES = ("data-part", "data", "base", "run")
# Stages whose runs train a ladder size: a grid over sizes and budgets applies to them.
SIZED_STAGES = ("pretrain", "lm", "finetune")
HEAD_OF_STAGE = {"pretrain": "reward", "finetune": "reward", "lm": "lm"}
# The config key that names the ladder size, per stage (default model.size).
SIZE_KEY = {"lm": "size"}
DEFAULT_VOCAB = 256  # CPU ladder sizes take the vocabulary from data; only `lm` N depends on it


# --------------------------------------------------------------------------- schema


@dataclass
class BudgetSpec:
    """One training length: exactly one of tokens, FLOPs, or tokens per parameter (D/N)."""

    tokens: float | None = field(default=None, metadata={"gt": 0})
    flops: float | None = field(default=None, metadata={"gt": 0})
    tokens_per_param: float | None = field(default=None, metadata={"gt": 0})

    def __post_init__(self):
        given = [k for k in ("tokens", "flops", "tokens_per_param") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError("<config>", "", "give exactly one of tokens, flops and "
                              f"tokens_per_param (got {', '.join(given) or 'none'})")

    @property
    def label(self) -> str:
        if self.tokens is not None:
            return f"tok{_short(self.tokens)}"
        if self.flops is not None:
            return f"flop{_short(self.flops)}"
        return f"tpp{_short(self.tokens_per_param)}"

    def stage_budget(self, n_params: int | None, where: str) -> dict:
        """The ``budget`` section a stage takes: tokens or FLOPs (ratios become tokens)."""
        if self.tokens is not None:
            return {"tokens": float(self.tokens)}
        if self.flops is not None:
            return {"flops": float(self.flops)}
        if n_params is None:
            raise ConfigError(where, "tokens_per_param", "needs a model size (grid.sizes)")
        return {"tokens": float(round(self.tokens_per_param * n_params))}


@dataclass
class Rule:
    """A config value derived from N, the non-embedding parameter count of a run's size.

    ``power``: ``base * (N / ref_params) ** exponent``; ``per_size``: ``values[SIZE]``;
    ``constant``: ``value``. Then clamped to [min, max]; with ``multiple_of`` (or
    ``integer``) rounded to the nearest multiple (an integer), at least one multiple.
    """

    rule: Literal["power", "per_size", "constant"] = "power"
    base: float | None = None
    exponent: float = 0.0
    ref_params: float | None = field(default=None, metadata={"gt": 0})
    values: dict[str, float] = field(default_factory=dict)
    value: float | None = None
    min: float | None = None
    max: float | None = None
    multiple_of: int | None = field(default=None, metadata={"ge": 1})
    integer: bool = False

    def __post_init__(self):
        if self.rule == "power" and (self.base is None or self.ref_params is None):
            raise ConfigError("<config>", "", "rule power needs base and ref_params")
        if self.rule == "per_size" and not self.values:
            raise ConfigError("<config>", "values", "rule per_size needs values: {SIZE: value}")
        if self.rule == "constant" and self.value is None:
            raise ConfigError("<config>", "value", "rule constant needs value")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ConfigError("<config>", "min", f"min {self.min} > max {self.max}")

    def evaluate(self, size: str, n_params: int, where: str) -> float | int:
        if self.rule == "power":
            v = self.base * (n_params / self.ref_params) ** self.exponent
        elif self.rule == "per_size":
            if size not in self.values:
                raise ConfigError(where, "values", f"no value for size {size!r}")
            v = float(self.values[size])
        else:
            v = float(self.value)
        if self.min is not None:
            v = max(v, self.min)
        if self.max is not None:
            v = min(v, self.max)
        if self.multiple_of or self.integer:
            m = self.multiple_of or 1
            return int(max(m, m * round(v / m)))
        return float(f"{v:.6g}")  # a readable number in config.yaml, same value every time


@dataclass
class Resources:
    """What one run asks the scheduler for. ``None`` means "inherit" (per size < defaults).

    ``time`` is minutes or a Slurm time (``MM``, ``HH:MM:SS``, ``D-HH:MM:SS``).
    ``zero_stage`` sets the DeepSpeed ZeRO stage (``engine.zero_stage``) of the run.
    """

    nodes: int | None = field(default=None, metadata={"ge": 1})
    gpus_per_node: int | None = field(default=None, metadata={"ge": 0})
    tasks_per_node: int | None = field(default=None, metadata={"ge": 1})  # default: GPUs or 1
    cpus_per_task: int | None = field(default=None, metadata={"ge": 1})
    mem_gb: float | None = field(default=None, metadata={"gt": 0})
    time: str | int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool | None = None
    zero_stage: int | None = field(default=None, metadata={"ge": 0, "le": 3})


RESOURCE_DEFAULTS = Resources(nodes=1, gpus_per_node=0, cpus_per_task=1, time=60, exclusive=False)


@dataclass(frozen=True)
class JobResources:
    """Fully resolved resources of one run (hashable: runs with equal ones share an array)."""

    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    cpus_per_task: int
    time_min: int
    mem_gb: float | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def slurm_time(self) -> str:
        days, rest = divmod(self.time_min, 24 * 60)
        hours, minutes = divmod(rest, 60)
        return f"{days}-{hours:02d}:{minutes:02d}:00" if days else f"{hours:02d}:{minutes:02d}:00"


@dataclass
class SizeOverride:
    resources: Resources = field(default_factory=Resources)
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardModelsSpec:
    """An ``rft`` grid over the reward models of another sweep (polar_scaling/sweep/rft_grid.py).

    Every grid run of that sweep (optionally only some sizes, budgets and seeds) is one arm
    (``reward.mode: rm``, ``reward.model: ITS_RUN/model``; a run waits until its RM run has
    finished); ``controls`` add ``untrained_rm`` (per selected size, an RM of that
    architecture with fresh weights) and ``random``. Unless this sweep has a ``data``
    section, its runs read the RM sweep's dataset.
    """

    sweep: str  # the RM sweep file; relative paths from this sweep file's folder
    root: str | None = None  # that sweep's root, if not its file's (relative: from the cwd)
    sizes: list[str] = field(default_factory=list)  # only these sizes (default: all)
    budgets: list[BudgetSpec] = field(default_factory=list)  # only these budgets
    seeds: list[int] = field(default_factory=list)  # only these seeds
    controls: list[Literal["untrained_rm", "random"]] = field(default_factory=list)


@dataclass
class GridSpec:
    sizes: list[str] = field(default_factory=list)
    budgets: list[BudgetSpec] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    axes: dict[str, list[Any]] = field(default_factory=dict)
    # Grid points to leave out: each entry matches on the keys it gives, e.g.
    # {size: 7B, budget: {flops: 1e18}} or {size: 50M, seed: 1}.
    exclude: list[dict[str, Any]] = field(default_factory=list)
    reward_models: RewardModelsSpec | None = None  # stage rft: an axis over another sweep's RMs


@dataclass
class DataSpec:
    """The dataset every run reads: an existing directory, or a ``generate`` run made first."""

    dir: str | None = None
    generate: dict[str, Any] | None = None
    # > 1: the generate run as an array of this many part jobs (at most one per shard), each
    # writing every jobs-th shard, then a finalize job that checks them and writes the manifest.
    jobs: int = field(default=1, metadata={"ge": 1})
    resources: Resources = field(default_factory=Resources)
    key: str = "data.dir"  # the config key of the runs (and base LMs) that names the dataset

    def __post_init__(self):
        if (self.dir is None) == (self.generate is None):
            raise ConfigError("<config>", "", "give exactly one of data.dir and data.generate")


@dataclass
class BaseSpec:
    """A base LM per ladder size (an ``lm`` run), shared by every run of that size."""

    budget: BudgetSpec
    config: dict[str, Any] = field(default_factory=dict)
    derived: dict[str, Rule] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    seed: int = 0
    key: str = "model.base"  # the config key of the runs that names the base model folder


@dataclass
class LaunchSpec:
    parallelism: int = field(default=8, metadata={"ge": 1})  # runs of one job array at once
    max_attempts: int = field(default=3, metadata={"ge": 1})  # submissions of a failing run
    max_requeues: int = field(default=10, metadata={"ge": 0})  # preemptions of one submission
    max_timeouts: int = field(default=3, metadata={"ge": 0})  # time-limit requeues (submitit)
    signal_delay_s: int = field(default=120, metadata={"ge": 1})  # USR2 before the time limit
    setup: list[str] = field(default_factory=list)  # shell lines run before the job
    env: dict[str, str] = field(default_factory=dict)  # exported in every job
    python: str | None = None  # interpreter on the compute nodes (default: this one)
    template: str | None = None  # batch template (default: slurm/templates/polar_job.sbatch)


@dataclass
class EstimateSpec:
    """Throughput model for the estimated time of ``--dry-run`` (and a time-limit check)."""

    seq_len: float | None = field(default=None, metadata={"gt": 0})  # tokens per sequence
    gpu_flops_per_s: float = field(default=4e14, metadata={"gt": 0})  # achieved, per GPU
    cpu_flops_per_s: float = field(default=5e10, metadata={"gt": 0})  # achieved, per CPU run
    eval_overhead: float = field(default=0.15, metadata={"ge": 0})  # share added for evals
    startup_s: float = field(default=30.0, metadata={"ge": 0})  # imports, data, engine set-up
    vocab: int = field(default=DEFAULT_VOCAB, metadata={"ge": 1})  # CPU sizes' vocab for N


@dataclass
class SweepFile:
    name: str
    root: str | None = None
    stage: Literal[STAGES] = "pretrain"
    config: dict[str, Any] = field(default_factory=dict)
    grid: GridSpec = field(default_factory=GridSpec)
    derived: dict[str, Rule] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    per_size: dict[str, SizeOverride] = field(default_factory=dict)
    data: DataSpec | None = None
    base: BaseSpec | None = None
    launch: LaunchSpec = field(default_factory=LaunchSpec)
    estimate: EstimateSpec = field(default_factory=EstimateSpec)


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: what it computes, where it lives, what it needs and waits for."""

    run_id: str  # readable name + hash of the config: the run directory's name
    name: str  # the readable part
    stage: str
    config: dict  # the complete stage config (the run's input; written before submit)
    role: str  # one of ROLES: "run" (a grid point), "data" (the dataset), "base" (a size's
    # base LM), "data-part" (a part of a dataset written by several jobs)
    size: str | None
    n_params: int | None  # non-embedding parameters, N of the scaling law
    seed: int | None
    budget: str | None  # label, e.g. tok2e6
    tokens: float | None  # training tokens (estimated from FLOPs for a FLOPs budget)
    flops: float | None  # training FLOPs (estimated from tokens for a tokens budget)
    resources: JobResources
    deps: tuple[str, ...] = ()  # run ids this run needs finished first
    estimate_s: float | None = None
    digest: str = ""  # hash of stage and config (the last part of run_id)
    flags: tuple[str, ...] = ()  # the stage's own polar-train flags, e.g. ("--part", "0/4")
    workdir: str | None = None  # the --run-dir the stage writes, if not its own run directory
    needs: tuple[str, ...] = ()  # files outside this sweep that must exist first (done.json
    # of another sweep's runs: the reward models of an rft grid)


@dataclass
class Sweep:
    """A validated sweep file and its expansion: dependencies first, then grid points."""

    spec: SweepFile
    path: Path
    root: Path
    runs: list[RunSpec]

    @property
    def by_id(self) -> dict[str, RunSpec]:
        return {r.run_id: r for r in self.runs}

    def ordered(self) -> list[RunSpec]:
        """Runs in an order where every run comes after its dependencies."""
        return sorted(self.runs, key=lambda r: ROLES.index(r.role))


# --------------------------------------------------------------------------- loading


def load_sweep(path: str | Path, overrides: list[str] = (), root: str | Path | None = None) -> Sweep:
    """Read, validate and expand a sweep file; any problem is a ConfigError naming the key.

    ``overrides`` are ``key.sub=value`` strings applied to the sweep file (e.g.
    ``grid.seeds=[0]``); ``root`` replaces the file's root directory.
    """
    path = Path(path)
    data = read_yaml(path)
    source = str(path)
    if overrides:
        data = apply_overrides(data, list(overrides))
        source = f"{path} + overrides"
    data = normalise_numbers(data, source)
    spec = from_dict(SweepFile, data, source)
    root_dir = resolve_root(root if root is not None else spec.root or f"runs/{spec.name}",
                            source)
    runs = expand(spec, root_dir, source, path.parent)
    return Sweep(spec=spec, path=path, root=root_dir, runs=runs)


def resolve_root(text: str | Path, source: str = "<sweep>") -> Path:
    """An absolute root directory; ``~`` and ``$VARS`` expanded, an unset variable an error."""
    expanded = os.path.expanduser(os.path.expandvars(str(text)))
    if "$" in expanded:
        raise ConfigError(source, "root", f"{text!r} names an unset environment variable")
    return Path(expanded).absolute()


def expand(spec: SweepFile, root: Path, source: str, base_dir: Path | None = None
           ) -> list[RunSpec]:
    """The sweep's runs: its data run, a base LM per size, then every grid point.
    ``base_dir``: the folder other sweep files are named relative to (the file's own)."""
    sized = spec.stage in SIZED_STAGES
    grid = spec.grid
    _check_grid(spec, sized, source)
    runs_dir = root / "runs"

    links: dict[str, Any] = {}
    deps: list[str] = []
    needs: tuple[str, ...] = ()
    prelude: list[RunSpec] = []
    arms: list = [None]  # grid.reward_models: one arm per reward model or control
    aliases: dict[str, str] = {}  # other roots in the config, hashed by name
    if grid.reward_models is not None:
        from polar_scaling.sweep.rft_grid import RM_ROOT, reward_arms

        rm = reward_arms(grid.reward_models, base_dir or Path.cwd(), source,
                         own_data=spec.data is not None)
        arms, needs, aliases = rm.arms, rm.needs, {str(rm.root): RM_ROOT}
        links.update(rm.links)
    if spec.data is not None:
        if spec.data.dir is not None:
            links[spec.data.key] = str(resolve_root(spec.data.dir, source))
        else:
            res = resolve_resources(spec, None, spec.data.resources, source, "data.resources")
            cfg = merge(spec.data.generate, {})
            run = _make_run("generate", "data", "data", cfg, None, None, None, None, res, (),
                            spec, root)
            parts = _data_parts(spec.data, cfg, source)
            if parts > 1:  # the same run id: how the dataset is split is not its content
                prelude += [_make_run("generate", f"data-part{i}of{parts}", "data-part", cfg,
                                      None, None, None, None, res, (), spec, root,
                                      flags=("--part", f"{i}/{parts}"),
                                      workdir=str(runs_dir / run.run_id))
                            for i in range(parts)]
                run = replace(run, deps=tuple(r.run_id for r in prelude),
                              flags=("--finalize", str(parts)))
            prelude.append(run)
            links[spec.data.key] = str(runs_dir / run.run_id)
            deps.append(run.run_id)

    base_of_size: dict[str, RunSpec] = {}
    if spec.base is not None:
        if not sized:
            raise ConfigError(source, "base", f"stage {spec.stage} trains no ladder size")
        for size in grid.sizes:
            n_lm = _n_params(size, "lm", spec.estimate.vocab)
            cfg = merge(spec.base.config, {})
            for key, rule in spec.base.derived.items():
                cfg = _set(cfg, key, rule.evaluate(size, n_lm, f"{source}: base.derived.{key}"))
            cfg = _set(cfg, SIZE_KEY.get("lm", "model.size"), size)
            cfg = _set(cfg, "budget", spec.base.budget.stage_budget(n_lm, f"{source}: base.budget"))
            cfg = _set(cfg, "seed", spec.base.seed)
            for key, value in links.items():
                cfg = _set(cfg, key, value)
            res = resolve_resources(spec, size, spec.base.resources, source,
                                    f"base.resources ({size})")
            run = _make_run("lm", f"lm-{size}-{spec.base.budget.label}", "base", cfg, size,
                            n_lm, spec.base.seed, spec.base.budget, res, tuple(deps), spec, root,
                            head="lm")
            base_of_size[size] = run
            prelude.append(run)

    axis_keys = list(grid.axes)
    axis_values = [grid.axes[k] for k in axis_keys]
    sizes = grid.sizes or [None]
    budgets = grid.budgets or [None]
    seeds = grid.seeds or [None]
    head = HEAD_OF_STAGE.get(spec.stage, "reward")
    runs: list[RunSpec] = []
    excluded = [_exclusion(e, source, i) for i, e in enumerate(grid.exclude)]
    for size, budget, seed, arm, *axis in itertools.product(sizes, budgets, seeds, arms,
                                                           *axis_values):
        point = {"size": size, "budget": budget.label if budget else None, "seed": seed}
        if any(all(point[k] == v for k, v in ex.items()) for ex in excluded):
            continue
        n = _n_params(size, head, spec.estimate.vocab) if size else None
        cfg = merge(spec.config, {})
        for key, rule in spec.derived.items():
            if size is None:
                raise ConfigError(source, f"derived.{key}", "rules need grid.sizes")
            cfg = _set(cfg, key, rule.evaluate(size, n, f"{source}: derived.{key}"))
        override = spec.per_size.get(size) if size else None
        if override is not None:
            cfg = merge(cfg, override.config)
        for key, value in zip(axis_keys, axis, strict=True):
            cfg = _set(cfg, key, value)
        for key, value in (arm.settings.items() if arm else ()):
            cfg = _set(cfg, key, value)
        if size is not None:
            cfg = _set(cfg, SIZE_KEY.get(spec.stage, "model.size"), size)
        if budget is not None:
            cfg = _set(cfg, "budget", budget.stage_budget(n, f"{source}: grid.budgets"))
        if seed is not None:
            cfg = _set(cfg, "seed", seed)
        for key, value in links.items():
            cfg = _set(cfg, key, value)
        run_deps = tuple(deps)
        if size in base_of_size:
            base = base_of_size[size]
            cfg = _set(cfg, spec.base.key, str(runs_dir / base.run_id / "model"))
            run_deps = (*run_deps, base.run_id)
        res = resolve_resources(spec, size, Resources(), source, "resources")
        if res.world_size > 1:
            _check_divisible(cfg, res, size, source)
        cfg = _apply_zero_stage(spec, size, cfg)
        parts = [spec.stage]
        if size is not None:
            parts.append(size)
        if budget is not None:
            parts.append(budget.label)
        if arm is not None:
            parts.append(arm.label)
        if seed is not None:
            parts.append(f"s{seed}")
        parts += [_axis_label(k, v) for k, v in zip(axis_keys, axis, strict=True)]
        runs.append(_make_run(spec.stage, "-".join(parts), "run", cfg, size, n, seed, budget,
                              res, run_deps, spec, root, head=head,
                              needs=needs + (arm.needs if arm else ()), aliases=aliases))

    seen: dict[str, RunSpec] = {}
    for run in prelude + runs:
        if run.digest in seen:
            raise ConfigError(source, "grid", f"duplicated grid point: {run.name} and "
                              f"{seen[run.digest].name} resolve to the same config")
        seen[run.digest] = run
    return prelude + runs


def resolve_resources(spec: SweepFile, size: str | None, extra: Resources, source: str,
                      where: str) -> JobResources:
    """Defaults < ``resources`` < ``per_size.SIZE.resources`` < ``extra``, fully resolved."""
    layers = [RESOURCE_DEFAULTS, spec.resources]
    if size is not None and size in spec.per_size:
        layers.append(spec.per_size[size].resources)
    layers.append(extra)
    merged = {}
    for layer in layers:
        merged.update({f.name: getattr(layer, f.name) for f in fields(layer)
                       if getattr(layer, f.name) is not None})
    time_min = parse_time(merged["time"], source, f"{where}.time")
    gpus = merged["gpus_per_node"]
    tasks = merged.get("tasks_per_node") or max(gpus, 1)
    if gpus and tasks != gpus:
        raise ConfigError(source, f"{where}.tasks_per_node",
                          f"one task per GPU: expected {gpus}, got {tasks}")
    return JobResources(nodes=merged["nodes"], gpus_per_node=gpus, tasks_per_node=tasks,
                        cpus_per_task=merged["cpus_per_task"], time_min=time_min,
                        mem_gb=merged.get("mem_gb"), partition=merged.get("partition"),
                        account=merged.get("account"), qos=merged.get("qos"),
                        constraint=merged.get("constraint"),
                        exclusive=bool(merged.get("exclusive")))


def parse_time(value: str | int | float, source: str, key: str) -> int:
    """Minutes from an int (minutes) or a Slurm time string ``MM``, ``HH:MM:SS``, ``D-HH:MM``."""
    if isinstance(value, bool):
        raise ConfigError(source, key, f"expected minutes or HH:MM:SS, got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ConfigError(source, key, f"expected a positive time, got {value!r}")
        return int(math.ceil(value))
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(value).strip())
    if not m:
        raise ConfigError(source, key, f"expected minutes, HH:MM:SS or D-HH:MM:SS, got {value!r}")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if b is None:  # "MM" or "D-HH"
        minutes = (a * 60) if days is not None else a
    elif c is None:  # "MM:SS" or "D-HH:MM"
        minutes = a * 60 + b if days is not None else a + (1 if b else 0)
    else:  # "HH:MM:SS"
        minutes = a * 60 + b + (1 if c else 0)
    minutes += (days or 0) * 24 * 60
    if minutes <= 0:
        raise ConfigError(source, key, f"expected a positive time, got {value!r}")
    return minutes


# --------------------------------------------------------------------------- helpers


def config_hash(stage: str, config: dict, root: Path, flags: tuple[str, ...] = (),
                aliases: dict[str, str] | None = None) -> str:
    """Hash of a run's stage, config and stage flags; paths under ``root`` count relative to
    it, so a moved sweep root keeps its run ids. ``aliases``: other folders (another sweep's
    root) hashed by a name in the same way."""
    doc = {"stage": stage, "config": config, **({"flags": list(flags)} if flags else {})}
    text = json.dumps(doc, sort_keys=True, default=str)
    for folder, name in sorted((aliases or {}).items(), key=lambda kv: -len(kv[0])):
        # a path that starts with the folder: from a quote to a '/' or the closing quote
        text = re.sub(r'(?<=")' + re.escape(folder) + r'(?=[/"])', lambda m, n=name: n, text)
    text = text.replace(str(root), "${ROOT}")
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def estimate_seq_len(spec: SweepFile) -> float:
    """Tokens per training sequence for FLOPs estimates: ``estimate.seq_len``, else the
    config's ``data.max_length`` (an upper bound), else 512."""
    if spec.estimate.seq_len:
        return spec.estimate.seq_len
    data = spec.config.get("data")
    if isinstance(data, dict) and isinstance(data.get("max_length"), (int, float)):
        return float(data["max_length"])
    return 512.0


def _data_parts(data: DataSpec, cfg: dict, source: str) -> int:
    """How many part jobs write the dataset: ``data.jobs``, at most one per shard."""
    if data.jobs == 1:
        return 1
    from polar_scaling.data_generate import GenerateArgs, plan_shards

    args = from_dict(GenerateArgs, cfg, source, "data.generate.")
    return min(data.jobs, len(plan_shards(args)))


def _make_run(stage, name, role, cfg, size, n, seed, budget, res, deps, spec, root, head="reward",
              flags=(), workdir=None, needs=(), aliases=None):
    tokens = flops = estimate = None
    if size is not None and budget is not None:
        fpt = flops_per_token(_ladder(size, spec.estimate.vocab), estimate_seq_len(spec), head)
        b = budget.stage_budget(n, "")
        tokens = b.get("tokens") or b["flops"] / fpt
        flops = b.get("flops") or b["tokens"] * fpt
        rate = (res.gpus * spec.estimate.gpu_flops_per_s if res.gpus
                else spec.estimate.cpu_flops_per_s)
        estimate = flops / rate * (1 + spec.estimate.eval_overhead) + spec.estimate.startup_s
    name = safe_name(name)
    digest = config_hash(stage, cfg, root, flags, aliases)
    return RunSpec(run_id=f"{name}-{digest}", digest=digest, name=name, stage=stage, config=cfg, role=role, size=size,
                   n_params=n, seed=seed, budget=budget.label if budget else None, tokens=tokens,
                   flops=flops, resources=res, deps=tuple(deps), estimate_s=estimate,
                   flags=tuple(flags), workdir=workdir, needs=tuple(needs))


def _check_grid(spec: SweepFile, sized: bool, source: str) -> None:
    grid = spec.grid
    for i, size in enumerate(grid.sizes):
        if size not in SIZES:
            raise ConfigError(source, f"grid.sizes[{i}]",
                              f"unknown model size {size!r} (known: {', '.join(SIZES)})")
    for size in spec.per_size:
        if size not in SIZES:
            raise ConfigError(source, f"per_size.{size}",
                              f"unknown model size {size!r} (known: {', '.join(SIZES)})")
    for name, items in (("sizes", grid.sizes), ("seeds", grid.seeds)):
        dup = sorted({str(x) for x in items if items.count(x) > 1})
        if dup:
            raise ConfigError(source, f"grid.{name}", f"duplicated grid point: {', '.join(dup)}")
    labels = [b.label for b in grid.budgets]
    dup = sorted({b for b in labels if labels.count(b) > 1})
    if dup:
        raise ConfigError(source, "grid.budgets", f"duplicated grid point: {', '.join(dup)}")
    for key, values in grid.axes.items():
        if not values:
            raise ConfigError(source, f"grid.axes.{key}", "expected a non-empty list")
        texts = [json.dumps(v, sort_keys=True) for v in values]
        dup = sorted({t for t in texts if texts.count(t) > 1})
        if dup:
            raise ConfigError(source, f"grid.axes.{key}", f"duplicated grid point: {dup[0]}")
        if grid.reward_models is not None and key in ("reward.mode", "reward.model"):
            raise ConfigError(source, f"grid.axes.{key}", "grid.reward_models sets reward.mode "
                              "and reward.model: set other reward keys in config")
        if key in ("model.size", "budget", "seed") or key.startswith("budget."):
            raise ConfigError(source, f"grid.axes.{key}", "use grid.sizes, grid.budgets or "
                              "grid.seeds for this key")
    if grid.reward_models is not None and spec.stage != "rft":
        raise ConfigError(source, "grid.reward_models", f"only for stage rft (this sweep's "
                          f"stage is {spec.stage})")
    if not sized and (grid.sizes or grid.budgets):
        raise ConfigError(source, "grid.sizes" if grid.sizes else "grid.budgets",
                          f"stage {spec.stage} trains no ladder size (sized stages: "
                          f"{', '.join(SIZED_STAGES)})")
    if any(b.tokens_per_param is not None for b in grid.budgets) and not grid.sizes:
        raise ConfigError(source, "grid.budgets", "tokens_per_param needs grid.sizes")
    if grid.sizes and not grid.budgets and "budget" not in spec.config:
        raise ConfigError(source, "grid.budgets", "give grid.budgets or config.budget")


def _exclusion(entry: dict, source: str, i: int) -> dict:
    key = f"grid.exclude[{i}]"
    unknown = sorted(set(entry) - {"size", "budget", "seed"})
    if unknown or not entry:
        raise ConfigError(source, key, f"expected some of size, budget, seed; got {sorted(entry)}")
    out = dict(entry)
    if "budget" in out:
        out["budget"] = from_dict(BudgetSpec, out["budget"], source, f"{key}.budget.").label
    return out


def _check_divisible(cfg: dict, res: JobResources, size: str | None, source: str) -> None:
    batch = (cfg.get("batch") or {}).get("size") if isinstance(cfg.get("batch"), dict) else None
    if isinstance(batch, int) and batch % res.world_size:
        raise ConfigError(source, f"batch.size ({size})", f"{batch} is not divisible by the "
                          f"{res.world_size} ranks of {res.nodes} node(s) x {res.tasks_per_node}")


def _apply_zero_stage(spec: SweepFile, size: str | None, cfg: dict) -> dict:
    stage = spec.resources.zero_stage
    if size is not None and size in spec.per_size:
        over = spec.per_size[size].resources.zero_stage
        stage = over if over is not None else stage
    return cfg if stage is None else _set(cfg, "engine.zero_stage", stage)


def _set(cfg: dict, dotted: str, value: Any) -> dict:
    """Set ``dotted`` in ``cfg`` (a run's own copy) to a copy of ``value`` and return ``cfg``;
    a mapping value replaces, it does not merge."""
    parts = dotted.split(".")
    node = cfg
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = copy.deepcopy(value) if isinstance(value, (dict, list)) else value
    return cfg


def _ladder(size: str, vocab: int) -> ModelSize:
    s = get_size(size)
    return s if s.vocab else s.with_vocab(vocab)


def _n_params(size: str, head: str, vocab: int) -> int:
    return non_embedding_params(_ladder(size, vocab), head)


def _axis_label(key: str, value: Any) -> str:
    short = key.split(".")[-1]
    if isinstance(value, float):
        return f"{short}{_short(value)}"
    if isinstance(value, (int, str, bool)):
        return f"{short}{value}"
    return f"{short}{hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:6]}"


def _short(x: float) -> str:
    """Compact number for names: 2000000 -> 2e6, 0.003 -> 3e-3, 0.05 -> 0.05, 20 -> 20."""
    x = float(x)
    if x.is_integer() and abs(x) < 1000:
        return str(int(x))
    if x != 0 and not -2 <= math.floor(math.log10(abs(x))) < 3:
        mantissa, exp = f"{x:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
    return f"{x:.4g}"


# PyYAML (YAML 1.1) reads 1e-3 and 2e6 as strings; the sweep reads them as the numbers they
# are, so a run's hash does not depend on how a number was spelled.
_SCI = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


_ENV = re.compile(r"\$\{(\w+)\}")


def normalise_numbers(value: Any, source: str = "<sweep>", key: str = "") -> Any:
    """``value`` with every string in scientific notation turned into a float and every
    ``${VAR}`` replaced by the environment variable (an unset one is a ConfigError)."""
    if isinstance(value, dict):
        return {k: normalise_numbers(v, source, f"{key}.{k}" if key else str(k))
                for k, v in value.items()}
    if isinstance(value, list):
        return [normalise_numbers(v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str) and _SCI.match(value):
        return float(value)
    if isinstance(value, str) and "${" in value:
        def env(m):
            if m.group(1) not in os.environ:
                raise ConfigError(source, key, f"environment variable {m.group(1)} is not set")
            return os.environ[m.group(1)]
        return _ENV.sub(env, value)
    return value


# --------------------------------------------------------------------------- stage configs

# A stage module names its config dataclass ``ARGS``, or one of these conventional names.
_ARGS_NAMES = ("ARGS", "{Stage}Args", "{STAGE}Args", "Args")


def stage_args_class(stage: str) -> type | None:
    """The config dataclass of ``stage`` (e.g. PretrainArgs), or None where the stage module
    does not expose one (its configs are then checked by the run itself)."""
    import importlib

    from polar_scaling.cli import STAGES as MODULES

    try:
        module = importlib.import_module(MODULES[stage][0])
    except ModuleNotFoundError as e:
        if e.name == MODULES[stage][0]:
            raise ConfigError("<sweep>", "stage", f"stage {stage!r} is not available here "
                              f"(no module {MODULES[stage][0]})") from None
        raise
    for pattern in _ARGS_NAMES:
        name = pattern.format(Stage=stage.capitalize(), STAGE=stage.upper())
        cls = getattr(module, name, None)
        if isinstance(cls, type) and is_dataclass(cls):
            return cls
    return None


def resolve_stage_config(run: RunSpec, source: str) -> dict | None:
    """The run's config as the stage resolves it (defaults filled in), checked against the
    stage's dataclass: a bad key or value is a ConfigError naming the run. None when the
    stage exposes no dataclass."""
    cls = stage_args_class(run.stage)
    if cls is None:
        return None
    args = from_dict(cls, run.config, f"{source} (run {run.name})")
    return to_dict(args)
