"""polar-analyze rft on hand-made tables: per-arm statistics over seeds, the ordering of the
reward models, unfinished runs left out, and clear errors for tables it cannot use."""

import json

import pandas as pd
import pytest

from analysis.cli import main
from analysis.result import FitError
from analysis.rft import rft_rows, summarize


def table(falls: dict, unfinished: tuple = (), names: bool = True) -> pd.DataFrame:
    """Rows as `polar-sweep collect` writes them: steps 0 and 10 of one run per (arm, seed);
    ``falls``: (arm name, mode, size, params, budget tokens) -> falls of the seeds."""
    rows = []
    for (arm, mode, size, params, tokens), values in falls.items():
        for seed, fall in enumerate(values):
            name = f"rft-{arm}-s{seed}"
            run = f"{name}-abc123"
            base = {"run_id": run, "stage": "rft", "seed": seed, "reward_mode": mode,
                    "reward_model": f"/rms/{arm}/model" if size else None, "rm_size": size,
                    "rm_params": params, "rm_tokens": tokens * 1.01 if tokens else tokens,
                    "rm_budget_tokens": tokens, **({"name": name} if names else {})}
            rows.append({**base, "step": 0, "true_kl": 60.0, "true_kl_per_token": 5.0,
                         "true_kl_fall": 0.0, "final": False})
            rows.append({**base, "step": 10, "true_kl": 60.0 * (1 - fall),
                         "true_kl_per_token": 5.0 * (1 - fall), "true_kl_fall": fall,
                         "final": run not in unfinished})
    return pd.DataFrame(rows)


NAN = float("nan")
ARMS = {("rm-t12k-tok2e6-rs0", "rm", "t12k", 1e4, 2e6): [0.05, 0.07, 0.09],
        ("rm-t50k-tok2e6-rs0", "rm", "t50k", 5e4, 2e6): [0.10, 0.12],
        ("rm-t100k-tok2e6-rs0", "rm", "t100k", 1e5, 2e6): [0.20, 0.26, 0.23],
        ("untrained-t100k", "untrained_rm", "t100k", 1e5, 0.0): [0.01, -0.01, 0.0],
        ("random", "random", None, NAN, NAN): [-0.02, 0.0, -0.01]}


def test_arms_statistics_and_ordering():
    s = summarize(rft_rows(table(ARMS, unfinished=("rft-rm-t50k-tok2e6-rs0-s1-abc123",))))
    arms = {a["arm"]: a for a in s["arms"]}
    assert list(arms) == ["rm-t12k-tok2e6-rs0", "rm-t50k-tok2e6-rs0", "rm-t100k-tok2e6-rs0",
                          "untrained-t100k", "random"]
    big = arms["rm-t100k-tok2e6-rs0"]
    assert big["runs"] == 3 and big["seeds"] == [0, 1, 2]
    assert big["fall_mean"] == pytest.approx(0.23)
    assert big["fall_sd"] == pytest.approx(0.03)  # sample sd of 0.20, 0.26, 0.23
    assert (big["fall_min"], big["fall_max"]) == pytest.approx((0.20, 0.26))
    assert big["true_kl_start"] == 60.0 and big["true_kl_end"] == pytest.approx(60 * 0.77)
    assert big["curve"]["step"] == [0, 10]
    assert big["curve"]["true_kl_fall"] == pytest.approx([0.0, 0.23])
    # The unfinished seed is left out, and named.
    assert arms["rm-t50k-tok2e6-rs0"]["runs"] == 1
    assert arms["rm-t50k-tok2e6-rs0"]["fall_sd"] is None
    assert s["unfinished_runs"] == ["rft-rm-t50k-tok2e6-rs0-s1-abc123"]
    assert s["best_control_fall"] == pytest.approx(0.0)
    assert big["margin_over_controls"] == pytest.approx(0.23)
    o = s["ordering"]
    assert o["spearman_fall_vs_params"] == pytest.approx(1.0)
    assert o["spearman_fall_vs_params_p"] == pytest.approx(2 / 6)  # 2 of 3! orders as extreme
    # One nominal budget: no token ordering, though the actual tokens differ by size.
    assert "spearman_fall_vs_tokens" not in o
    # A reversed ladder is reported as such.
    flipped = {("rm-a", "rm", "t12k", 1e4, 2e6): [0.3], ("rm-b", "rm", "t100k", 1e5, 2e6): [0.1]}
    o = summarize(rft_rows(table(flipped)))["ordering"]
    assert o["spearman_fall_vs_params"] == pytest.approx(-1.0)
    assert o["spearman_fall_vs_params_p"] == pytest.approx(1.0)  # two RMs prove nothing


def test_runs_that_differ_in_more_than_the_seed_are_separate_arms():
    # Two RMs of one size (RM seeds 0 and 1) and two KL coefficients of the RFT sweep: four
    # arms of two seeds each, not one arm of eight runs.
    falls = {(f"rm-t25k-tok2e6-rs{r}-kl_coef{k}", "rm", "t25k", 2.5e4, 2e6): [0.1 * r + k, k]
             for r in (0, 1) for k in (0.1, 0.3)}
    s = summarize(rft_rows(table(falls)))
    assert sorted(a["arm"] for a in s["arms"]) == sorted(arm for arm, *_ in falls)
    assert all(a["runs"] == 2 and a["seeds"] == [0, 1] for a in s["arms"])
    # Without run names, runs are told apart by their reward model.
    s = summarize(rft_rows(table(falls, names=False)))
    assert sorted(a["arm"] for a in s["arms"]) == sorted(f"rm {arm}" for arm, *_ in falls)


def test_a_run_without_its_start_is_left_out_and_named(tmp_path):
    rows = table(ARMS)
    lost = "rft-rm-t12k-tok2e6-rs0-s2-abc123"
    rows = rows[~((rows["run_id"] == lost) & (rows["step"] == 0))].copy()
    rows.loc[rows["run_id"] == lost, "true_kl_fall"] = NAN  # as collect writes it
    s = summarize(rft_rows(rows))
    small = next(a for a in s["arms"] if a["arm"] == "rm-t12k-tok2e6-rs0")
    assert small["runs"] == 2 and small["fall_mean"] == pytest.approx(0.06)
    assert s["runs_without_start"] == [lost] and s["unfinished_runs"] == []
    path = tmp_path / "t.csv"
    rows.to_csv(path, index=False)
    assert main(["rft", str(path), "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    doc = json.loads((tmp_path / "o" / "rft.json").read_text())  # valid JSON: no NaN
    assert doc["arms"][-1]["rm_params"] is None and doc["runs_without_start"] == [lost]


def test_cli_writes_json_markdown_and_figures(tmp_path):
    path = tmp_path / "results.csv"
    table(ARMS).to_csv(path, index=False)
    assert main(["rft", str(path), "--out", str(tmp_path / "out")]) == 0
    doc = json.loads((tmp_path / "out" / "rft.json").read_text())
    assert doc["table"] == str(path) and len(doc["arms"]) == 5
    md = (tmp_path / "out" / "rft.md").read_text()
    assert "| rm-t100k-tok2e6-rs0 | 1e+05 | 2e+06 | 3 | 23.0% ± 3.0 [20.0, 26.0] |" in md
    assert "Spearman ρ of the mean fall with the RM's params: +1.00 (permutation p = 0.33)" in md
    for stem in ("rft_fall", "rft_curves"):
        assert (tmp_path / "out" / f"{stem}.png").stat().st_size > 1000


def test_tables_it_cannot_use_are_clear_errors(tmp_path, capsys):
    pretrain = tmp_path / "pretrain.csv"
    pd.DataFrame({"run_id": ["a"], "step": [1], "loss": [0.5], "final": [True]}).to_csv(
        pretrain, index=False)
    assert main(["rft", str(pretrain), "--out", str(tmp_path / "o")]) == 2
    assert "column 'true_kl' not in table: not an rft results table" in capsys.readouterr().err
    with pytest.raises(FitError, match="none of the 14 rft run"):
        running = table(ARMS)
        running["final"] = False
        summarize(rft_rows(running))
    empty = table(ARMS)
    empty["true_kl"] = NAN
    with pytest.raises(FitError, match="no row has a true_kl value"):
        rft_rows(empty)
