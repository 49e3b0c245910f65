"""Extrapolation check: fit without the largest models, predict them, report the error."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.result import FitError


def split_largest(df: pd.DataFrame, k: int, by: str = "params") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, held_out): held_out holds every row whose `by` is among the k largest values.

    Raises FitError when fewer than two distinct values would be left to fit.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    sizes = np.sort(df[by].unique())[::-1]
    if len(sizes) - k < 2:
        raise FitError(
            f"cannot hold out the {k} largest {by}: the table has {len(sizes)} distinct "
            f"values and the fit needs at least 2 left"
        )
    cut = sizes[k - 1]
    held = df[by] >= cut
    return df[~held].reset_index(drop=True), df[held].reset_index(drop=True)


def relative_errors(observed: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """(predicted - observed) / observed."""
    observed = np.asarray(observed, dtype=float)
    return (np.asarray(predicted, dtype=float) - observed) / observed


def extrapolation_summary(points: pd.DataFrame) -> dict:
    """JSON-ready summary of a table with `observed`, `predicted` and identifying columns.

    Adds `rel_error` per point and the mean and max absolute relative error.
    """
    pts = points.copy()
    pts["rel_error"] = relative_errors(pts["observed"], pts["predicted"])
    abs_err = np.abs(pts["rel_error"].to_numpy())
    return {
        "n_heldout": int(len(pts)),
        "mean_abs_rel_error": float(abs_err.mean()),
        "max_abs_rel_error": float(abs_err.max()),
        "points": pts.to_dict(orient="records"),
    }
