"""polar-analyze rft on hand-made tables: per-arm statistics over seeds, the ordering of the
reward models, unfinished runs left out, and clear errors for tables it cannot use."""

import json

import pandas as pd
import pytest

from analysis.cli import main
from analysis.result import FitError
from analysis.rft import rft_rows, summarize


def table(falls: dict, unfinished: tuple = ()) -> pd.DataFrame:
    """Rows as `polar-sweep collect` writes them: steps 0 and 10 of one run per (arm, seed);
    ``falls``: (mode, size, params, tokens) -> falls of the seeds."""
    rows = []
    for (mode, size, params, tokens), values in falls.items():
        for seed, fall in enumerate(values):
            run = f"rft-{mode}-{size}-s{seed}"
            model = f"/rms/{size}/model" if size else None
            base = {"run_id": run, "stage": "rft", "seed": seed, "reward_mode": mode,
                    "reward_model": model, "rm_size": size, "rm_params": params,
                    "rm_tokens": tokens}
            rows.append({**base, "step": 0, "true_kl": 60.0, "true_kl_per_token": 5.0,
                         "true_kl_fall": 0.0, "final": False})
            rows.append({**base, "step": 10, "true_kl": 60.0 * (1 - fall),
                         "true_kl_per_token": 5.0 * (1 - fall), "true_kl_fall": fall,
                         "final": run not in unfinished})
    return pd.DataFrame(rows)


ARMS = {("rm", "t12k", 1e4, 2e6): [0.05, 0.07, 0.09], ("rm", "t50k", 5e4, 2e6): [0.10, 0.12],
        ("rm", "t100k", 1e5, 2e6): [0.20, 0.26, 0.23], ("untrained_rm", "t100k", 1e5, 2e6):
        [0.01, -0.01, 0.0], ("random", None, float("nan"), float("nan")): [-0.02, 0.0, -0.01]}


def test_arms_statistics_and_ordering():
    s = summarize(rft_rows(table(ARMS, unfinished=("rft-rm-t50k-s1",))))
    arms = {a["arm"]: a for a in s["arms"]}
    assert list(arms) == ["rm t12k 2e+06 tokens", "rm t50k 2e+06 tokens",
                          "rm t100k 2e+06 tokens", "untrained_rm t100k", "random"]
    big = arms["rm t100k 2e+06 tokens"]
    assert big["runs"] == 3 and big["seeds"] == [0, 1, 2]
    assert big["fall_mean"] == pytest.approx(0.23)
    assert big["fall_sd"] == pytest.approx(0.03)  # sample sd of 0.20, 0.26, 0.23
    assert (big["fall_min"], big["fall_max"]) == pytest.approx((0.20, 0.26))
    assert big["true_kl_start"] == 60.0 and big["true_kl_end"] == pytest.approx(60 * 0.77)
    assert big["curve"]["step"] == [0, 10]
    assert big["curve"]["true_kl_fall"] == pytest.approx([0.0, 0.23])
    # The unfinished seed is left out, and named.
    assert arms["rm t50k 2e+06 tokens"]["runs"] == 1
    assert arms["rm t50k 2e+06 tokens"]["fall_sd"] is None
    assert s["unfinished_runs"] == ["rft-rm-t50k-s1"]
    assert s["best_control_fall"] == pytest.approx(0.0)
    assert big["margin_over_controls"] == pytest.approx(0.23)
    assert s["ordering"]["spearman_fall_vs_params"] == pytest.approx(1.0)
    assert "spearman_fall_vs_tokens" not in s["ordering"]  # one token budget: no ordering
    # A reversed ladder is reported as such.
    flipped = {("rm", "t12k", 1e4, 2e6): [0.3], ("rm", "t100k", 1e5, 2e6): [0.1]}
    assert summarize(rft_rows(table(flipped)))["ordering"]["spearman_fall_vs_params"] == \
        pytest.approx(-1.0)


def test_cli_writes_json_markdown_and_figures(tmp_path):
    path = tmp_path / "results.csv"
    table(ARMS).to_csv(path, index=False)
    assert main(["rft", str(path), "--out", str(tmp_path / "out")]) == 0
    doc = json.loads((tmp_path / "out" / "rft.json").read_text())
    assert doc["table"] == str(path) and len(doc["arms"]) == 5
    md = (tmp_path / "out" / "rft.md").read_text()
    assert "| rm t100k 2e+06 tokens | 1e+05 | 2e+06 | 3 | 23.0% ± 3.0 [20.0, 26.0] |" in md
    assert "Spearman ρ of the mean fall with the RM's params: +1.00" in md
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
    empty["true_kl"] = float("nan")
    with pytest.raises(FitError, match="no row has a true_kl value"):
        rft_rows(empty)
