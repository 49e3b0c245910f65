"""A dataset written by several jobs (``data.jobs``): the expansion into part runs and a
finalize run, their batch scripts and dependencies, and the status of parts (no Slurm)."""

from __future__ import annotations

import json

import pytest
import yaml
from sweep_helpers import polar_sweep

from polar_scaling.config import ConfigError
from polar_scaling.sweep.spec import load_sweep
from polar_scaling.sweep.store import Store

# 6 shards: train 4 (120 prompts by 30), heldout_prompts 1, heldout_policies 1.
GENERATE = {"prompts": {"train": 120, "heldout_prompts": 16, "heldout_policies": 16},
            "shard_prompts": 30}


def sweep_file(tmp_path, jobs, **doc):
    base = {"name": "t", "stage": "pretrain",
            "data": {"generate": GENERATE, "jobs": jobs, "resources": {"time": 5}},
            "base": {"budget": {"tokens": 2048}},
            "grid": {"sizes": ["t12k", "t25k"], "budgets": [{"tokens": 1e4}], "seeds": [0]},
            "launch": {"parallelism": 2}}
    base.update(doc)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def test_jobs_split_the_generate_run_into_parts_and_a_finalize_run(tmp_path):
    single = load_sweep(sweep_file(tmp_path, 1), root=tmp_path / "root")
    sweep = load_sweep(sweep_file(tmp_path, 3), root=tmp_path / "root")
    *parts, data, lm12, lm25, run12, run25 = sweep.runs
    assert [p.role for p in parts] == ["data-part"] * 3
    # The dataset keeps its run id (and directory): how it is split is not its content.
    assert data.run_id == single.runs[0].run_id and single.runs[0].flags == ()
    assert (data.role, data.flags, data.deps) == ("data", ("--finalize", "3"),
                                                  tuple(p.run_id for p in parts))
    data_dir = str(tmp_path / "root" / "runs" / data.run_id)
    for i, part in enumerate(parts):
        assert part.name == f"data-part{i}of3" and part.stage == "generate"
        assert (part.flags, part.workdir, part.deps) == (("--part", f"{i}/3"), data_dir, ())
        assert part.config == data.config == GENERATE
    # Everything downstream waits for the finalized dataset, never for the parts.
    assert lm12.deps == lm25.deps == (data.run_id,)
    assert run12.deps == (data.run_id, lm12.run_id)
    assert [r.run_id for r in sweep.runs[4:]] == [r.run_id for r in single.runs[1:]]
    # At most one job per shard.
    many = load_sweep(sweep_file(tmp_path, 50), root=tmp_path / "root")
    assert [r.name for r in many.runs if r.role == "data-part"][-1] == "data-part5of6"
    with pytest.raises(ConfigError, match=r"data\.jobs: expected a value >= 1"):
        load_sweep(sweep_file(tmp_path, 0), root=tmp_path / "root")
    with pytest.raises(ConfigError, match="data.generate.shard_prompts"):
        load_sweep(sweep_file(tmp_path, 2, data={"generate": {"shard_prompts": 0}, "jobs": 2}),
                   root=tmp_path / "root")


def test_dry_run_scripts_an_array_of_parts_then_finalize_then_the_rest(tmp_path):
    path = sweep_file(tmp_path, 3)
    code, out = polar_sweep("dry-run", path, "--root", tmp_path / "root")
    assert code == 0, out
    scripts = {p.stem: p.read_text().splitlines()
               for p in (tmp_path / "root" / "scripts" / "dry-run").glob("*.sbatch")}
    assert sorted(scripts) == ["generate-finalize", "generate-parts", "lm", "pretrain-t12k",
                               "pretrain-t25k"]
    assert "#SBATCH --array=0-2%3" not in scripts["generate-parts"]  # parallelism caps it
    assert "#SBATCH --array=0-2%2" in scripts["generate-parts"]
    assert not any(ln.startswith("#SBATCH --dependency") for ln in scripts["generate-parts"])
    assert ("#SBATCH --dependency=afterok:<generate-parts_0>:<generate-parts_1>:"
            "<generate-parts_2>") in scripts["generate-finalize"]
    assert "#SBATCH --dependency=afterok:<generate-finalize>" in scripts["lm"]
    assert "#SBATCH --dependency=afterok:<generate-finalize>:<lm_0>" in scripts["pretrain-t12k"]
    assert "8 runs" in out


def test_parts_of_a_finished_dataset_are_done(tmp_path):
    # A dataset written by one job, then the sweep asks for 3: nothing is left to submit.
    sweep = load_sweep(sweep_file(tmp_path, 3), root=tmp_path / "root")
    store = Store(sweep.root)
    data = next(r for r in sweep.runs if r.role == "data")
    store.run_dir(data.run_id).mkdir(parents=True)
    assert [s.state for s in store.status(sweep, probe=False)][:4] == ["new"] * 4
    (store.run_dir(data.run_id) / "done.json").write_text(json.dumps({"shards": 6}))
    assert [s.state for s in store.status(sweep, probe=False)][:4] == ["done"] * 4


def test_local_executor_writes_the_parts_then_finalizes(tmp_path):
    from tiny_world import TINY_GENERATE

    from polar_scaling.config import from_dict
    from polar_scaling.data_generate import GenerateArgs, generate

    # 4 shards of the tiny world in 2 parts, as local jobs (2 at once), then the finalize job.
    config = {**TINY_GENERATE, "kl": {"enabled": False}}
    path = sweep_file(tmp_path, 2, base=None, data={"generate": config, "jobs": 2})
    root = tmp_path / "root"
    code, out = polar_sweep("launch", path, "--root", root, "--executor", "local",
                            "--only", "data*")
    assert code == 0, out
    sweep = load_sweep(path, root=root)
    store = Store(root)
    states = {s.run.name: s.state for s in store.status(sweep)}
    assert states == {"data-part0of2": "done", "data-part1of2": "done", "data": "done",
                      "pretrain-t12k-tok1e4-s0": "new", "pretrain-t25k-tok1e4-s0": "new"}
    generate(from_dict(GenerateArgs, config), tmp_path / "single")
    data_dir = store.run_dir(sweep.runs[2].run_id)
    for name in ("shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet",
                 "shard-00003.parquet"):
        assert (data_dir / "shards" / name).read_bytes() == \
            (tmp_path / "single" / "shards" / name).read_bytes()
    manifests = [json.loads((d / "manifest.json").read_text())
                 for d in (data_dir, tmp_path / "single")]
    for m in manifests:
        for s in m["shards"]:
            del s["seconds"]
    assert manifests[0] == manifests[1]
    code, out = polar_sweep("launch", path, "--root", root, "--executor", "local",
                            "--only", "data*")
    assert code == 0 and "0 run(s) to submit" in out, out
