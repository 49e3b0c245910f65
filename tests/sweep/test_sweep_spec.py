"""Sweep files: grid expansion, derived per-size settings, budgets, run ids, validation."""

from __future__ import annotations

import pytest
import yaml

from polar_scaling.config import ConfigError
from polar_scaling.sizes import flops_per_token, get_size, non_embedding_params
from polar_scaling.sweep.spec import Rule, load_sweep, parse_time, resolve_stage_config


def sweep_file(tmp_path, name="s.yaml", **doc):
    base = {"name": "t", "stage": "pretrain", "data": {"dir": "/data/world"},
            "grid": {"sizes": ["t12k", "t25k"], "budgets": [{"tokens": 1e5}], "seeds": [0]}}
    base.update(doc)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def n_of(size, head="reward"):
    return non_embedding_params(get_size(size).with_vocab(256), head)


def test_grid_is_the_product_of_sizes_budgets_seeds_and_axes(tmp_path):
    path = sweep_file(tmp_path, grid={
        "sizes": ["t12k", "t25k"], "budgets": [{"tokens": 1e5}, {"flops": 1e12}],
        "seeds": [0, 1], "axes": {"optim.lr": ["1e-3", 3e-3]}})
    sweep = load_sweep(path, root=tmp_path / "root")
    assert len(sweep.runs) == 2 * 2 * 2 * 2
    assert len({r.run_id for r in sweep.runs}) == 16
    run = sweep.runs[0]
    assert run.name == "pretrain-t12k-tok1e5-s0-lr1e-3"
    assert run.run_id.startswith(run.name + "-") and len(run.run_id) == len(run.name) + 11
    assert run.config["model"]["size"] == "t12k"
    assert run.config["budget"] == {"tokens": 1e5}
    assert run.config["seed"] == 0
    # "1e-3" (a string to PyYAML) is the number 0.001, as 3e-3 is.
    assert [r.config["optim"]["lr"] for r in sweep.runs[:2]] == [0.001, 0.003]
    flops_run = next(r for r in sweep.runs if r.budget == "flop1e12")
    assert flops_run.config["budget"] == {"flops": 1e12}
    fpt = flops_per_token(get_size("t12k").with_vocab(256), 512.0)
    assert flops_run.tokens == pytest.approx(1e12 / fpt)
    assert run.flops == pytest.approx(1e5 * fpt)


def test_run_ids_are_stable_and_follow_the_config(tmp_path):
    path = sweep_file(tmp_path)
    first = [r.run_id for r in load_sweep(path, root=tmp_path / "a").runs]
    assert first == [r.run_id for r in load_sweep(path, root=tmp_path / "a").runs]
    # The same numbers spelled differently are the same runs.
    respelled = sweep_file(tmp_path, "r.yaml", grid={
        "sizes": ["t12k", "t25k"], "budgets": [{"tokens": 100000}], "seeds": [0]})
    assert [r.run_id for r in load_sweep(respelled, root=tmp_path / "a").runs] == first
    # Any change of a run's config is a new run id (same readable name).
    changed = load_sweep(path, ["config.optim.lr=0.002"], root=tmp_path / "a").runs
    assert [r.name for r in changed] == [rid.rsplit("-", 1)[0] for rid in first]
    assert not set(r.run_id for r in changed) & set(first)


def test_generated_data_and_base_lms_are_dependencies(tmp_path):
    path = sweep_file(tmp_path, data={"generate": {"prompts": {"train": 50}}},
                      base={"budget": {"tokens_per_param": 10}, "config": {"batch": {"size": 8}}},
                      grid={"sizes": ["t12k", "t25k"],
                            "budgets": [{"tokens": 1e5}, {"tokens": 2e5}], "seeds": [0]})
    sweep = load_sweep(path, root=tmp_path / "root")
    data, lm12, lm25, *runs = sweep.runs
    assert (data.role, data.stage, data.deps) == ("data", "generate", ())
    assert data.config == {"prompts": {"train": 50}}
    data_dir = str(tmp_path / "root" / "runs" / data.run_id)
    for lm, size in ((lm12, "t12k"), (lm25, "t25k")):
        assert (lm.role, lm.stage, lm.deps) == ("base", "lm", (data.run_id,))
        assert lm.config["size"] == size  # the lm stage names its size at top level
        assert lm.config["data"]["dir"] == data_dir
        assert lm.config["budget"] == {"tokens": float(10 * n_of(size, "lm"))}
    assert len(runs) == 4
    for run in runs:
        lm = lm12 if run.size == "t12k" else lm25
        assert run.deps == (data.run_id, lm.run_id)
        assert run.config["model"]["base"] == str(tmp_path / "root" / "runs" / lm.run_id / "model")
        assert run.config["data"]["dir"] == data_dir
    # Every budget of a size shares one base LM.
    assert len({r.deps for r in runs if r.size == "t12k"}) == 1
    # Moving the root keeps every id (paths under the root count relative to it).
    moved = load_sweep(path, root=tmp_path / "elsewhere")
    assert [r.run_id for r in moved.runs] == [r.run_id for r in sweep.runs]
    # A changed data config changes the data run and, through it, every run.
    other = load_sweep(path, ["data.generate.prompts.train=60"], root=tmp_path / "root")
    assert not {r.run_id for r in other.runs} & {r.run_id for r in sweep.runs}


def test_budgets_in_tokens_per_parameter(tmp_path):
    path = sweep_file(tmp_path, grid={"sizes": ["t12k", "t25k"],
                                      "budgets": [{"tokens_per_param": 20}], "seeds": [0]})
    runs = load_sweep(path, root=tmp_path / "r").runs
    for run in runs:
        assert run.n_params == n_of(run.size)
        assert run.config["budget"] == {"tokens": float(20 * n_of(run.size))}
        assert run.budget == "tpp20"


def test_derived_settings_are_functions_of_n(tmp_path):
    derived = {
        "optim.lr": {"rule": "power", "base": 1e-3, "exponent": -0.5, "ref_params": 13440},
        "batch.size": {"rule": "power", "base": 32, "exponent": 1.0, "ref_params": 13440,
                       "multiple_of": 8, "max": 48},
        "optim.warmup_ratio": {"rule": "per_size", "values": {"t12k": 0.1, "t25k": 0.05}},
    }
    path = sweep_file(tmp_path, derived=derived,
                      per_size={"t25k": {"config": {"optim": {"warmup_ratio": 0.2}}}})
    r12, r25 = load_sweep(path, root=tmp_path / "r").runs
    assert r12.n_params == 13440
    assert r12.config["optim"]["lr"] == pytest.approx(1e-3)
    assert r25.config["optim"]["lr"] == pytest.approx(1e-3 * (26816 / 13440) ** -0.5, rel=1e-5)
    assert r12.config["batch"]["size"] == 32
    assert r25.config["batch"]["size"] == 48  # 63.8 clamped to max 48, a multiple of 8
    assert r12.config["optim"]["warmup_ratio"] == 0.1
    assert r25.config["optim"]["warmup_ratio"] == 0.2  # per-size config beats a rule
    # An axis beats a rule (an LR scan around the derived value is a separate sweep file).
    scan = load_sweep(path, ['grid.axes={"optim.lr": [0.01]}'], root=tmp_path / "r").runs
    assert {r.config["optim"]["lr"] for r in scan} == {0.01}


def test_rule_rounding_and_clamps():
    rule = Rule(rule="power", base=100, exponent=1.0, ref_params=10, multiple_of=64, min=64)
    assert rule.evaluate("x", 1, "") == 64  # 10 -> at least one multiple
    assert rule.evaluate("x", 10, "") == 128  # 100 -> nearest multiple of 64
    assert Rule(rule="constant", value=3, integer=True).evaluate("x", 5, "") == 3
    with pytest.raises(ConfigError, match="no value for size 'x'"):
        Rule(rule="per_size", values={"y": 1.0}).evaluate("x", 5, "where")


def test_per_size_resources_and_zero_stage(tmp_path):
    path = sweep_file(
        tmp_path, grid={"sizes": ["1B", "7B"], "budgets": [{"flops": 1e19}], "seeds": [0]},
        config={"batch": {"size": 512}},
        resources={"gpus_per_node": 1, "time": "12:00:00", "partition": "gpu", "zero_stage": 1},
        per_size={"7B": {"resources": {"nodes": 2, "gpus_per_node": 8, "zero_stage": 3,
                                       "time": "2-00:00:00", "qos": "high"}}})
    r1b, r7b = load_sweep(path, root=tmp_path / "r").runs
    assert (r1b.resources.gpus, r1b.resources.time_min, r1b.resources.partition) == (1, 720, "gpu")
    assert r1b.config["engine"]["zero_stage"] == 1
    res = r7b.resources
    assert (res.nodes, res.gpus_per_node, res.tasks_per_node, res.world_size) == (2, 8, 8, 16)
    assert (res.time_min, res.slurm_time, res.qos, res.partition) == (2880, "2-00:00:00",
                                                                      "high", "gpu")
    assert r7b.config["engine"]["zero_stage"] == 3
    assert r7b.estimate_s == pytest.approx(r7b.flops / (16 * 4e14) * 1.15 + 30)
    # A global batch that 16 ranks cannot split is refused before anything runs.
    with pytest.raises(ConfigError, match=r"batch.size \(7B\).*500 is not divisible by the 16"):
        load_sweep(path, ["config.batch.size=500"], root=tmp_path / "r")


def test_excluded_grid_points(tmp_path):
    path = sweep_file(tmp_path, grid={
        "sizes": ["t12k", "t25k"], "budgets": [{"tokens": 1e5}, {"flops": 1e12}], "seeds": [0, 1],
        "exclude": [{"size": "t25k", "budget": {"flops": 1e12}}, {"seed": 1, "size": "t12k"}]})
    names = [r.name for r in load_sweep(path, root=tmp_path / "r").runs]
    assert names == ["pretrain-t12k-tok1e5-s0", "pretrain-t12k-flop1e12-s0",
                     "pretrain-t25k-tok1e5-s0", "pretrain-t25k-tok1e5-s1"]


@pytest.mark.parametrize("grid, message", [
    ({"sizes": ["t12k", "t99k"], "budgets": [{"tokens": 1e5}]},
     r"grid.sizes\[1\]: unknown model size 't99k' \(known: t12k, t25k"),
    ({"sizes": ["t12k", "t12k"], "budgets": [{"tokens": 1e5}]},
     "grid.sizes: duplicated grid point: t12k"),
    ({"sizes": ["t12k"], "budgets": [{"tokens": 1e5}], "seeds": [1, 2, 1]},
     "grid.seeds: duplicated grid point: 1"),
    ({"sizes": ["t12k"], "budgets": [{"tokens": 1e5}, {"tokens": 100000}]},
     "grid.budgets: duplicated grid point: tok1e5"),
    # Two spellings of one budget resolve to the same config.
    ({"sizes": ["t12k"], "budgets": [{"tokens": 268800}, {"tokens_per_param": 20}]},
     "duplicated grid point: pretrain-t12k-tpp20 and pretrain-t12k-tok2.69e5 resolve to the "
     "same config"),
    ({"sizes": ["t12k"], "budgets": [{"tokens": 1e5, "flops": 1e12}]},
     "give exactly one of tokens, flops and tokens_per_param"),
    ({"budgets": [{"tokens_per_param": 20}]}, "tokens_per_param needs grid.sizes"),
    ({"sizes": ["t12k"], "budgets": [{"tokens": 1e5}], "axes": {"optim.lr": [1e-3, 0.001]}},
     r"grid.axes.optim.lr: duplicated grid point"),
])
def test_bad_grids_are_clear_errors(tmp_path, grid, message):
    path = sweep_file(tmp_path, grid=grid)
    with pytest.raises(ConfigError, match=message) as err:
        load_sweep(path, root=tmp_path / "r")
    assert str(path) in str(err.value)


def test_bad_keys_and_values_name_file_and_key(tmp_path):
    path = sweep_file(tmp_path, resourcs={"nodes": 2})
    with pytest.raises(ConfigError, match=r"s.yaml: resourcs: unknown key \(known: base, "):
        load_sweep(path)
    path = sweep_file(tmp_path, resources={"time": "soon"})
    with pytest.raises(ConfigError, match="resources.time: expected minutes, HH:MM:SS"):
        load_sweep(path, root=tmp_path / "r")
    path = sweep_file(tmp_path, per_size={"t7k": {"resources": {"nodes": 2}}})
    with pytest.raises(ConfigError, match="per_size.t7k: unknown model size 't7k'"):
        load_sweep(path, root=tmp_path / "r")
    path = sweep_file(tmp_path, root="${POLAR_TEST_UNSET_VARIABLE}/sweeps")
    with pytest.raises(ConfigError, match="root: environment variable "
                                          "POLAR_TEST_UNSET_VARIABLE is not set"):
        load_sweep(path)
    path = sweep_file(tmp_path, stage="rft")
    with pytest.raises(ConfigError, match="stage rft trains no ladder size"):
        load_sweep(path, root=tmp_path / "r")


def test_stage_configs_are_checked_against_the_stage(tmp_path):
    path = sweep_file(tmp_path, config={"optim": {"lr": 1e-3, "momentum": 0.9}})
    run = load_sweep(path, root=tmp_path / "r").runs[0]
    with pytest.raises(ConfigError, match=r"run pretrain-t12k-tok1e5-s0\): optim.momentum: "
                                          r"unknown key"):
        resolve_stage_config(run, str(path))
    good = load_sweep(sweep_file(tmp_path, "g.yaml"), root=tmp_path / "r").runs[0]
    resolved = resolve_stage_config(good, "g.yaml")
    # Defaults are filled in; the sweep's values are kept.
    assert resolved["model"]["size"] == "t12k" and resolved["budget"]["tokens"] == 1e5
    assert resolved["optim"]["beta2"] == 0.95


@pytest.mark.parametrize("text, minutes", [
    (30, 30), ("45", 45), ("01:30:00", 90), ("00:00:30", 1), ("2-00:00:00", 2880),
    ("1-12", 2160), ("10:30", 11)])
def test_slurm_time_formats(text, minutes):
    assert parse_time(text, "f", "k") == minutes
