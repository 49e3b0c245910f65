"""RFT grids over the reward models of another sweep: RM size (and budget) → policy gain.

An ``rft`` sweep with ``grid.reward_models: {sweep: tiny.yaml, ...}`` gets one arm per
selected grid run of that sweep (``reward.mode: rm``, ``reward.model: RUN/model``), plus
the controls it asks for: ``untrained_rm`` once per selected size (the size's first RM run of
the whole grid names the architecture; its weights are drawn fresh) and ``random``. The arms cross
with the sweep's seeds and axes like any other axis. The RM runs live in the other sweep's
root, so they are not dependencies inside this sweep: each arm *needs* its RM run's
``done.json``, and until it exists the run is ``waiting`` and a launch leaves it alone
(``launch.make_plan``). Run ids hash the RM paths relative to the RM sweep's root, so they do
not change with the directory the sweeps are launched from.
Pure: the other sweep file is read and expanded, nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from polar_scaling.config import ConfigError, read_yaml

# Stages whose runs export a reward model (RUN/model) that RFT can score with.
RM_STAGES = ("pretrain", "finetune")
RM_ROOT = "${RM_ROOT}"  # the RM sweep's root, in the text run ids are hashed from


@dataclass(frozen=True)
class Arm:
    label: str  # the part of the run name, e.g. rm-t25k-tok2e6-rs0, untrained-t25k, random
    settings: dict  # dotted config key -> value
    needs: tuple[str, ...] = ()  # files that must exist before a run of the arm starts


@dataclass(frozen=True)
class RewardGrid:
    arms: list[Arm]
    links: dict[str, str]  # data.dir -> the RM sweep's dataset (empty if this sweep has one)
    needs: tuple[str, ...]  # the dataset's done.json, when the RM sweep generates it
    root: Path  # the RM sweep's root (hashed as RM_ROOT)


def reward_arms(spec, base_dir: Path, source: str, own_data: bool) -> RewardGrid:
    """The arms of ``grid.reward_models`` (a RewardModelsSpec).

    Without a ``data`` section of its own (``own_data``) the sweep's runs read the RM sweep's
    dataset: its ``data.dir``, or the directory of its ``generate`` run.
    """
    from polar_scaling.sweep.spec import load_sweep, resolve_root

    key = "grid.reward_models"
    path = Path(spec.sweep).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        raise ConfigError(source, f"{key}.sweep", f"no sweep file {path}")
    stage = (read_yaml(path) or {}).get("stage", "pretrain")
    if stage not in RM_STAGES:  # checked before expanding it: an rft sweep could name itself
        raise ConfigError(source, f"{key}.sweep", f"{path} is a {stage} sweep; reward models "
                          f"come from {' or '.join(RM_STAGES)} sweeps")
    try:
        other = load_sweep(path, root=spec.root)
    except ConfigError as e:
        raise ConfigError(source, f"{key}.sweep", f"{path}: {e}") from None
    budgets = {b.label for b in spec.budgets}
    grid_runs = [r for r in other.runs if r.role == "run"]
    picked = [r for r in grid_runs
              if (not spec.sizes or r.size in spec.sizes)
              and (not budgets or r.budget in budgets)
              and (not spec.seeds or r.seed in spec.seeds)]
    for name, wanted, have in (("sizes", spec.sizes, {r.size for r in grid_runs}),
                               ("budgets", budgets, {r.budget for r in grid_runs}),
                               ("seeds", spec.seeds, {r.seed for r in grid_runs})):
        missing = [w for w in wanted if w not in have]
        if missing:
            raise ConfigError(source, f"{key}.{name}", f"{missing[0]!r} is not in the grid of "
                              f"{path} (it has {sorted(map(str, have))})")
    if not picked:
        raise ConfigError(source, key, f"no grid run of {path} matches the selection")

    runs_dir = other.root / "runs"
    arms: list[Arm] = []
    for run in picked:
        run_dir = runs_dir / run.run_id
        # the RM's own seed as rs0, so that the rft run's s0 stays the RFT seed
        label = "rm-" + "-".join(f"r{p}" if p == f"s{run.seed}" else p
                                 for p in run.name.removeprefix(f"{run.stage}-").split("-"))
        arms.append(Arm(label, {"reward.mode": "rm", "reward.model": str(run_dir / "model")},
                        (str(run_dir / "done.json"),)))
    if "untrained_rm" in spec.controls:
        # The architecture and tokenizer come from one RM of the size: the first of the whole
        # grid by run id, so that a change of the selection does not make the control new.
        for size in dict.fromkeys(r.size for r in picked):
            run_dir = runs_dir / min(r.run_id for r in grid_runs if r.size == size)
            arms.append(Arm(f"untrained-{size}" if size else "untrained",
                            {"reward.mode": "untrained_rm", "reward.model": str(run_dir / "model")},
                            (str(run_dir / "done.json"),)))
    if "random" in spec.controls:
        arms.append(Arm("random", {"reward.mode": "random", "reward.model": None}))

    links: dict[str, str] = {}
    needs: tuple[str, ...] = ()
    data = other.spec.data
    if not own_data:
        if data is None or data.key != "data.dir":
            raise ConfigError(source, "data", f"the RM sweep {path} names no dataset in "
                              "data.dir: give this sweep a data section (data: {dir: ...})")
        data_run = next((r for r in other.runs if r.role == "data"), None)
        if data_run is not None:
            links["data.dir"] = str(runs_dir / data_run.run_id)
            needs = (str(runs_dir / data_run.run_id / "done.json"),)
        else:
            links["data.dir"] = str(resolve_root(data.dir, str(path)))
    return RewardGrid(arms, links, needs, other.root)
