import numpy as np
import pandas as pd
import pytest
from synthetic_tables import learning_curves

from analysis.envelope import final_points, lower_envelope
from analysis.load import Columns, read_table, standardize
from analysis.result import FitError


def test_standardize_cleans_a_results_table():
    raw = learning_curves(sizes=(1e7, 1e8), points=5)
    df = standardize(raw, need=("compute",))
    # 2 runs × (1 step-0 eval + 5 train-only rows + 5 evals)
    assert df.attrs["rows_read"] == 22
    assert df.attrs["dropped_nan_loss"] == 10
    assert df.attrs["dropped_zero_compute"] == 2
    assert len(df) == 10 and df["loss"].notna().all()
    assert list(df.columns) == ["loss", "params", "tokens", "compute", "group", "step", "final"]
    finals = df[df["final"]]
    assert sorted(finals["group"]) == ["run0", "run1"]
    assert (finals["step"] == 5).all()


def test_tokens_derived_from_compute_and_compute_from_tokens():
    raw = pd.DataFrame({"N": [1e8, 2e8], "C": [6e17, 2.4e18], "L": [3.0, 2.8]})
    df = standardize(raw, Columns(params="N", compute="C", loss="L"), need=("tokens",))
    np.testing.assert_allclose(df["tokens"], [1e9, 2e9])
    assert df.attrs["derived"] == ["tokens = compute / (6 · params)"]
    raw = pd.DataFrame({"params": [1e8], "tokens": [1e9], "loss": [3.0]})
    df = standardize(raw, need=("compute",))
    assert df["compute"].iloc[0] == pytest.approx(6e17)


def test_missing_column_error_names_the_flag():
    raw = pd.DataFrame({"params": [1e8], "loss": [3.0]})
    with pytest.raises(FitError, match=r"'flops'.*--compute"):
        standardize(raw, need=("compute",))
    with pytest.raises(FitError, match=r"'loss'.*--loss"):
        standardize(pd.DataFrame({"x": [1]}))


def test_bad_values_are_errors_that_name_the_column():
    raw = pd.DataFrame({"params": [1e8, -1.0], "tokens": [1e9, 1e9], "loss": [3.0, 2.0]})
    with pytest.raises(FitError, match="'params'.*non-positive"):
        standardize(raw, need=("params",))
    raw = pd.DataFrame({"params": [1e8, np.nan], "tokens": [1e9, 1e9], "loss": [3.0, 2.0]})
    with pytest.raises(FitError, match="'params'.*NaN"):
        standardize(raw, need=("params",))
    with pytest.raises(FitError, match="no rows with a loss"):
        standardize(pd.DataFrame({"params": [1.0], "loss": [np.nan]}))


def test_unfinished_runs_have_no_final_point():
    raw = learning_curves(sizes=(1e7, 1e8), points=4)
    raw.loc[raw["run_id"] == "run1", "final"] = False
    df = standardize(raw, need=("compute",))
    assert list(final_points(df)["group"]) == ["run0"]
    raw["final"] = False
    with pytest.raises(FitError, match="no run is marked final"):
        final_points(standardize(raw, need=("compute",)))


def test_final_flag_strings_and_tables_without_final_column():
    raw = pd.DataFrame({"run_id": ["a", "a", "b"], "step": [1, 2, 1], "params": [1, 1, 2],
                        "tokens": [1, 2, 1], "loss": [3.0, 2.0, 2.5],
                        "final": ["False", "True", "false"]})
    df = standardize(raw)
    assert list(df.loc[df["final"], "group"]) == ["a"]
    df = standardize(raw.drop(columns="final"))
    assert sorted(df.loc[df["final"], "group"]) == ["a", "b"]


def test_lower_envelope_is_the_pareto_front():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"compute": rng.uniform(1, 100, 300), "loss": rng.uniform(1, 5, 300),
                       "group": "g"})
    env = lower_envelope(df)
    assert env["compute"].is_monotonic_increasing
    assert env["loss"].is_monotonic_decreasing
    # No point of the table is at or below an envelope point's compute with a lower loss.
    for c, loss in zip(env["compute"], env["loss"], strict=True):
        assert not ((df["compute"] <= c) & (df["loss"] < loss)).any()
    # Every non-envelope point is dominated by some envelope point.
    rest = df.merge(env, how="left", indicator=True).query("_merge == 'left_only'")
    for c, loss in zip(rest["compute"], rest["loss"], strict=True):
        assert ((env["compute"] <= c) & (env["loss"] <= loss)).any()


def test_envelope_of_learning_curves_keeps_run_identity():
    df = standardize(learning_curves(), need=("compute",))
    env = lower_envelope(df)
    assert env["group"].nunique() == 5
    assert set(env.columns) >= {"params", "tokens", "group"}


def test_nullable_integer_columns_from_parquet(tmp_path):
    # The sweep manager stores params and step as nullable Int64.
    raw = learning_curves(sizes=(1e7, 1e8), points=3)
    for col in ("params", "step"):
        raw[col] = raw[col].astype("Int64")
    raw.loc[0, "params"] = pd.NA  # a step-0 row: dropped anyway for its zero compute
    raw.to_parquet(tmp_path / "r.parquet")
    df = standardize(read_table(tmp_path / "r.parquet"), need=("params", "compute"))
    assert df["params"].dtype == float and len(df) == 6
    assert sorted(final_points(df)["params"]) == [1e7, 1e8]
    raw.loc[2, "params"] = pd.NA  # an evaluation row
    raw.to_parquet(tmp_path / "r.parquet")
    with pytest.raises(FitError, match="'params'.*NaN"):
        standardize(read_table(tmp_path / "r.parquet"), need=("params",))


def test_read_table_csv_and_parquet(tmp_path):
    raw = learning_curves(sizes=(1e7,), points=3)
    raw.to_csv(tmp_path / "t.csv", index=False)
    raw.to_parquet(tmp_path / "t.parquet")
    a, b = read_table(tmp_path / "t.csv"), read_table(tmp_path / "t.parquet")
    assert len(a) == len(b) == len(raw)
    with pytest.raises(FitError, match="does not exist"):
        read_table(tmp_path / "missing.csv")
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(FitError, match="unknown table format"):
        read_table(tmp_path / "t.json")
