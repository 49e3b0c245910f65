import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from synthetic_tables import learning_curves

from analysis.cli import main
from analysis.envelope import lower_envelope
from analysis.load import standardize
from analysis.powerlaw import fit_power_law

REPO = Path(__file__).resolve().parents[2]
COMMON_KEYS = {"r2", "pearson_r", "ci", "n_points", "stderr", "converged", "warnings", "form"}


def load(out: Path) -> dict:
    return json.loads((out / "fit.json").read_text())


def assert_figures(out: Path, stem: str) -> None:
    for ext in ("png", "pdf"):
        f = out / f"{stem}.{ext}"
        assert f.is_file() and f.stat().st_size > 5_000, f


def test_power_on_compute_envelope(results_csv, tmp_path):
    out = tmp_path / "power"
    rc = main(["fit", str(results_csv), "--form", "power", "--x", "compute", "--out", str(out),
               "--bootstrap", "50"])
    assert rc == 0
    doc = load(out)
    assert COMMON_KEYS | {"a", "b"} <= set(doc)
    assert set(doc["ci"]) == {"a", "b"}
    # The default for --x compute is the lower envelope of every learning curve.
    table = standardize(pd.read_csv(results_csv), need=("compute",))
    env = lower_envelope(table)
    direct = fit_power_law(env["compute"].to_numpy(), env["loss"].to_numpy())
    assert doc["n_points"] == len(env)
    assert doc["b"] == pytest.approx(direct.params["b"], rel=1e-9)
    assert doc["pearson_r"] == pytest.approx(direct.pearson_r, rel=1e-9)
    assert doc["selection"]["envelope"] is True and doc["selection"]["final_only"] is False
    assert doc["ci"]["b"][0] < doc["b"] < doc["ci"]["b"][1]
    assert_figures(out, "power_compute")
    report = (out / "report.md").read_text()
    assert "| b |" in report and "power_compute.png" in report


def test_compute_envelope_of_finished_runs(results_csv, tmp_path):
    # --envelope --final-only: the envelope of each run's final point, not of every evaluation.
    out = tmp_path / "final_env"
    assert main(["fit", str(results_csv), "--form", "power", "--x", "compute", "--envelope",
                 "--final-only", "--out", str(out), "--bootstrap", "0", "--no-plots"]) == 0
    doc = load(out)
    assert doc["selection"]["envelope"] is True and doc["selection"]["final_only"] is True
    table = standardize(pd.read_csv(results_csv), need=("compute",))
    env = lower_envelope(table[table["final"]])
    direct = fit_power_law(env["compute"].to_numpy(), env["loss"].to_numpy())
    assert doc["n_points"] == len(env) == 5
    assert doc["b"] == pytest.approx(direct.params["b"], rel=1e-9)


def test_power_on_params_uses_final_points(results_csv, tmp_path):
    out = tmp_path / "params"
    assert main(["fit", str(results_csv), "--form", "power", "--x", "params",
                 "--out", str(out), "--bootstrap", "0", "--no-plots"]) == 0
    assert not list(out.glob("*.png"))
    doc = load(out)
    assert doc["n_points"] == 5 and doc["selection"]["final_only"] is True
    assert doc["b"] < 0
    assert doc["ci_method"].startswith("Student t")


def test_saturating_extrapolation_check(tmp_path):
    table = tmp_path / "results.csv"
    learning_curves(sizes=(2e7, 5e7, 1.2e8, 3e8, 7e8, 1.5e9), tokens_per_param=40).to_csv(
        table, index=False)
    out = tmp_path / "sat"
    assert main(["fit", str(table), "--form", "saturating", "--x", "compute",
                 "--holdout-largest", "1", "--out", str(out), "--bootstrap", "40"]) == 0
    doc = load(out)
    assert {"E", "A", "alpha"} <= set(doc)
    ext = doc["extrapolation"]
    assert ext["n_heldout"] == 1
    point = ext["points"][0]
    assert point["params"] == 1.5e9 and point["group"] == "run5"
    assert point["rel_error"] == pytest.approx(point["predicted"] / point["observed"] - 1)
    assert ext["mean_abs_rel_error"] < 0.1
    assert_figures(out, "saturating_compute")
    assert "Extrapolation check" in (out / "report.md").read_text()


def test_chinchilla_on_olmo_with_holdout(anchors, tmp_path):
    out = tmp_path / "olmo"
    assert main(["fit", str(anchors / "olmo_ladder_final_points.csv"), "--form", "chinchilla",
                 "--params", "n_params", "--loss", "c4_en-validation", "--group", "source_path",
                 "--holdout-largest", "2", "--bootstrap", "0", "--out", str(out)]) == 0
    doc = load(out)
    assert COMMON_KEYS | {"E", "A", "B", "alpha", "beta"} <= set(doc)
    assert doc["n_points"] == 25
    assert doc["extrapolation"]["max_abs_rel_error"] < 0.01
    assert {p["params"] for p in doc["extrapolation"]["points"]} == {6887575552, 13202396160}
    assert_figures(out, "chinchilla")


def test_console_script_runs_in_a_subprocess(results_csv, tmp_path):
    out = tmp_path / "sub"
    exe = Path(sys.executable).parent / "polar-analyze"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "analysis.cli"]
    proc = subprocess.run([*cmd, "fit", str(results_csv), "--form", "power", "--x", "params",
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "power fit on 5 points" in proc.stdout
    assert COMMON_KEYS | {"a", "b"} <= set(load(out))
    assert_figures(out, "power_params")
    bad = subprocess.run([*cmd, "fit", str(results_csv), "--form", "power", "--loss", "nope",
                          "--out", str(out)], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert bad.returncode == 2
    assert "column 'nope'" in bad.stderr and "--loss" in bad.stderr


def test_isoflop_cli_on_porian(anchors, tmp_path):
    out = tmp_path / "iso"
    assert main(["fit", str(anchors / "porian2024_isoflop_points.csv"), "--form", "isoflop",
                 "--params", "n_params", "--where", "config_id == 4", "--optimum", "akima",
                 "--bootstrap", "20", "--holdout-largest", "2", "--out", str(out)]) == 0
    doc = load(out)
    assert COMMON_KEYS | {"a", "b"} <= set(doc)
    assert doc["a"] == pytest.approx(0.497, abs=0.03)
    assert len(doc["optima"]) == 10  # the two largest budgets are held out
    ext = doc["extrapolation"]
    assert ext["n_heldout"] == 2
    assert {p["quantity"] for p in ext["points"]} == {"N_opt"}
    assert sorted(p["compute"] for p in ext["points"]) == pytest.approx([1.28e19, 2.56e19])
    assert ext["max_abs_rel_error"] < 0.15
    assert_figures(out, "isoflop")


def test_allocation_and_envelope_commands(results_csv, tmp_path):
    out = tmp_path / "alloc"
    assert main(["fit", str(results_csv), "--form", "allocation", "--bootstrap", "30",
                 "--out", str(out)]) == 0
    doc = load(out)
    assert 0 < doc["a"] < 1 and doc["a"] + doc["b"] == pytest.approx(1.0)
    assert_figures(out, "allocation")
    out = tmp_path / "env"
    assert main(["envelope", str(results_csv), "--out", str(out)]) == 0
    env = pd.read_csv(out / "envelope.csv")
    assert env["compute"].is_monotonic_increasing and env["loss"].is_monotonic_decreasing
    table = standardize(pd.read_csv(results_csv), need=("compute",))
    assert len(env) == len(lower_envelope(table))
    assert_figures(out, "envelope")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--form", "power", "--compute", "nope"], "'nope' for compute not in table"),
        (["--form", "chinchilla", "--where", "params < 3e7"], "too few points"),
        (["--form", "power", "--where", "no such column"], "--where"),
        (["--form", "isoflop", "--envelope"], "--envelope applies to power and saturating"),
        (["--form", "power", "--holdout-largest", "4"], "cannot hold out the 4 largest"),
    ],
)
def test_hopeless_requests_exit_nonzero_with_the_cause(results_csv, tmp_path, capsys, args,
                                                       message):
    rc = main(["fit", str(results_csv), "--out", str(tmp_path / "x"), "--no-plots", *args])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x" / "fit.json").exists()


def test_nan_loss_table_is_rejected(tmp_path, capsys):
    table = tmp_path / "t.csv"
    pd.DataFrame({"params": [1e7, 2e7], "flops": [1e15, 2e15], "loss": [np.nan, np.nan]}).to_csv(
        table, index=False)
    assert main(["fit", str(table), "--form", "power", "--out", str(tmp_path / "o")]) == 2
    assert "no rows with a loss" in capsys.readouterr().err
