"""The compute envelope: the lowest loss any run has reached at a given compute."""

from __future__ import annotations

import pandas as pd

from analysis.result import FitError


def lower_envelope(df: pd.DataFrame, x: str = "compute", y: str = "loss") -> pd.DataFrame:
    """Rows of df that set a new lowest y when all rows are read in increasing x.

    This is the Pareto front of (x, y) over every run's learning curve: a row is kept when
    no row at smaller or equal x has a lower or equal y. The result is sorted by x and keeps
    every column, so each envelope point still names its run, params and tokens.
    """
    if df.empty:
        raise FitError("cannot take the envelope of an empty table")
    ordered = df.sort_values([x, y], kind="stable")
    best_before = ordered[y].cummin().shift(1)
    keep = best_before.isna() | (ordered[y] < best_before)
    return ordered[keep.to_numpy()].reset_index(drop=True)


def final_points(df: pd.DataFrame) -> pd.DataFrame:
    """The last row with a loss of every finished run (rows flagged `final` by standardize)."""
    out = df[df["final"]].reset_index(drop=True)
    if out.empty:
        raise FitError(
            "no run is marked final=True in the table; fit all points instead "
            "(--all-points) or wait for runs to finish"
        )
    return out
