"""Batch scripts: a golden test of sweeps/compute.yaml (multi-node included), and the parts of
the template that must hold for every script."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from sweep_helpers import REPO, polar_sweep

from polar_scaling.sweep.render import fill, torch_extensions_dir

GOLDEN = Path(__file__).parent / "golden" / "compute"
CLUSTER_ENV = {"POLAR_DATA": "/data/polar", "POLAR_BASES": "/models/polar-bases"}


@pytest.fixture
def compute_scripts(tmp_path, monkeypatch):
    """Dry-run sweeps/compute.yaml; returns {script name: text with machine paths replaced}."""
    for k, v in CLUSTER_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("POLAR_SWEEPS", str(tmp_path / "sweeps"))
    code, out = polar_sweep("dry-run", REPO / "sweeps" / "compute.yaml")
    assert code == 0, out
    root = tmp_path / "sweeps" / "compute"
    scripts = {}
    for path in sorted((root / "scripts" / "dry-run").glob("*.sbatch")):
        text = path.read_text().replace(str(root), "ROOT").replace(sys.executable, "PYTHON")
        scripts[path.name] = text.replace(torch_extensions_dir(), "TORCH_EXTENSIONS_DIR")
    assert not (root / "jobs").exists() or not any((root / "jobs").rglob("*.pkl"))
    return scripts


def test_compute_scripts_match_golden(compute_scripts):
    if os.environ.get("POLAR_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for old in GOLDEN.glob("*.sbatch"):
            old.unlink()
        for name, text in compute_scripts.items():
            (GOLDEN / name).write_text(text)
    golden = {p.name: p.read_text() for p in sorted(GOLDEN.glob("*.sbatch"))}
    assert sorted(compute_scripts) == sorted(golden), "set POLAR_UPDATE_GOLDEN=1 to rewrite"
    for name, text in compute_scripts.items():
        assert text == golden[name], f"{name} differs from {GOLDEN / name}"


def test_multi_node_script_starts_one_task_per_gpu(compute_scripts):
    text = compute_scripts["pretrain-7B.sbatch"]
    lines = text.splitlines()
    for expected in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8",
                     "#SBATCH --gpus-per-node=8", "#SBATCH --time=3-00:00:00",
                     "#SBATCH --signal=USR2@300", "#SBATCH --requeue", "#SBATCH --exclusive",
                     "#SBATCH --array=0-2%3", "#SBATCH --qos=normal", "#SBATCH --mem=480G",
                     "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))"):
        assert expected in lines, expected
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in lines
    srun = [ln for ln in lines if ln.startswith("srun ")]
    assert len(srun) == 1 and "--kill-on-bad-exit=1" in srun[0]
    assert "%A_%a_%t_log.out" in srun[0]  # one log per task of each array element
    assert lines[-1].strip() == "PYTHON -u -m submitit.core._submit ROOT/jobs/dry-run"
    # The code snapshot comes first on PYTHONPATH; DeepSpeed's op cache is shared.
    assert "export PYTHONPATH=ROOT/code/SNAPSHOT${PYTHONPATH:+:$PYTHONPATH}" in lines
    assert "export TORCH_EXTENSIONS_DIR=TORCH_EXTENSIONS_DIR" in lines
    # A single-GPU size asks for no more than it needs.
    small = compute_scripts["pretrain.sbatch"].splitlines()
    assert "#SBATCH --nodes=1" in small and "#SBATCH --gpus-per-node=1" in small
    assert "#SBATCH --array=0-9%10" in small  # 50M and 100M: 10 runs, cap 16


def test_dry_run_prints_every_run_with_n_tokens_flops_gpus_and_time(compute_scripts, tmp_path,
                                                                    monkeypatch):
    for k, v in CLUSTER_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("POLAR_SWEEPS", str(tmp_path / "sweeps2"))
    code, out = polar_sweep("launch", REPO / "sweeps" / "compute.yaml", "--dry-run")
    assert code == 0, out
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("pretrain-")]
    assert len(rows) == 7 * 5 - 2
    by_name = {r[0].rsplit("-", 1)[0]: r for r in rows}
    # RUN STAGE N TOKENS FLOPS GPUS NODES LIMIT EST.TIME ACTION
    assert by_name["pretrain-7B-flop1e20-s0"][2:8] == ["6.98G", "2.22G", "1.00e+20", "16", "2",
                                                       "3d00h"]
    assert by_name["pretrain-7B-flop1e20-s0"][8] == "4h59m"  # 1e20 / (16 x 4e14) x 1.15 + 30 s
    assert by_name["pretrain-50M-flop1e18-s0"][5] == "1"
    assert all(r[-1] == "submit" for r in rows)
    assert "nothing submitted" in out
    assert not (tmp_path / "sweeps2" / "compute" / "runs").exists()


def test_fill_drops_empty_placeholder_lines_and_rejects_unknown_names():
    assert fill("a\n{{x}}\nb {{y}}\n", {"x": "", "y": 1}) == "a\nb 1\n"
    with pytest.raises(ValueError, match="unknown placeholder"):
        fill("{{nope}}", {})


def test_tiny_dry_run_chains_data_base_lms_and_runs(tmp_path):
    import yaml

    spec = yaml.safe_load((REPO / "sweeps" / "tiny.yaml").read_text())
    sizes, n_budgets = spec["grid"]["sizes"], len(spec["grid"]["budgets"])
    parts = spec["data"].get("jobs", 1)
    code, out = polar_sweep("dry-run", REPO / "sweeps" / "tiny.yaml", "--root", tmp_path)
    assert code == 0, out
    scripts = {p.stem: p.read_text().splitlines()
               for p in (tmp_path / "scripts" / "dry-run").glob("*.sbatch")}
    data = ["generate-finalize", "generate-parts"] if parts > 1 else ["generate"]
    assert sorted(scripts) == sorted(data + ["lm"] + [f"pretrain-{s}" for s in sizes])
    gen = "<generate-finalize>" if parts > 1 else "<generate>"
    if parts > 1:
        deps = ":".join(f"<generate-parts_{i}>" for i in range(parts))
        assert f"#SBATCH --dependency=afterok:{deps}" in scripts["generate-finalize"]
    assert not any(ln.startswith("#SBATCH --dependency") for ln in scripts[data[-1]])
    assert f"#SBATCH --dependency=afterok:{gen}" in scripts["lm"]
    assert f"#SBATCH --array=0-{len(sizes) - 1}%2" in scripts["lm"]  # a base LM per size
    for i, size in enumerate(sizes):
        lines = scripts[f"pretrain-{size}"]
        # Every budget of a size waits for the data and for that size's base LM only.
        assert f"#SBATCH --dependency=afterok:{gen}:<lm_{i}>" in lines
        assert "#SBATCH --kill-on-invalid-dep=yes" in lines
        assert f"#SBATCH --array=0-{n_budgets - 1}%2" in lines
    n_runs = (parts + 1 if parts > 1 else 1) + len(sizes) * (1 + n_budgets)
    assert f"{n_runs} runs" in out and "nothing submitted" in out


def test_tiny_lr_shares_the_data_and_base_lms_of_tiny(tmp_path):
    """sweeps/tiny_lr.yaml parses and reuses tiny.yaml's dataset and base LMs (same run ids)."""
    from polar_scaling.sweep.spec import load_sweep

    tiny = load_sweep(REPO / "sweeps" / "tiny.yaml", root=tmp_path)
    lr = load_sweep(REPO / "sweeps" / "tiny_lr.yaml", root=tmp_path)
    shared = {r.run_id for r in tiny.runs if r.role != "run"}
    assert shared and shared == {r.run_id for r in lr.runs if r.role != "run"}
    runs = [r for r in lr.runs if r.role == "run"]
    assert {r.size for r in runs} == set(tiny.spec.grid.sizes)
    assert len({r.config["optim"]["lr"] for r in runs}) >= 3
