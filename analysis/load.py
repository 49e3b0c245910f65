"""Read a result table (CSV or Parquet) into the standard columns every fit works on.

Standard columns: params, tokens, compute, loss, group, step, final. Defaults for the source
names are those of the project's own results table (ROOT/results.csv from the sweep manager).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.result import FitError

AXES = ("params", "tokens", "compute")


@dataclass(frozen=True)
class Columns:
    """Names of the source columns that hold each standard quantity."""

    params: str = "params"
    tokens: str = "tokens"
    compute: str = "flops"
    loss: str = "loss"
    group: str = "run_id"
    step: str = "step"
    final: str = "final"


def read_table(path: str | Path) -> pd.DataFrame:
    """Load a .csv, .parquet or .pq file; raise FitError naming the path if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FitError(f"table {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if suffix in (".csv", ".tsv", ".txt"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    except Exception as exc:  # pandas raises many types; the user needs the path and cause
        raise FitError(f"cannot read {path}: {exc}") from exc
    raise FitError(f"{path}: unknown table format {suffix!r} (expected .csv or .parquet)")


def standardize(
    raw: pd.DataFrame, columns: Columns = Columns(), need: tuple[str, ...] = ()
) -> pd.DataFrame:
    """Map raw columns to the standard ones and clean the rows.

    Tokens are derived as compute/(6·params) when only compute is present, and compute as
    6·params·tokens when only tokens is. Rows without a loss (train-only lines) are dropped,
    and so are rows at exactly zero compute or tokens (the evaluation before training), which
    a log axis cannot show. `final` marks, per finished run, its last row that has a loss; a
    run is finished when any of its rows has final=True, or always when the table has no
    `final` column. Every axis in `need` must be present (or derivable) with finite
    positive values: otherwise FitError names the column and the flag that selects it.
    The counts of dropped rows and what was derived are kept in `df.attrs`.
    """
    if columns.loss not in raw.columns:
        raise FitError(_missing(raw, columns.loss, "--loss"))
    out = pd.DataFrame(index=raw.index)
    # float, not the nullable Int64 a Parquet table may carry, so a missing value is NaN.
    out["loss"] = pd.to_numeric(raw[columns.loss], errors="coerce").astype(float)
    derived = []
    for axis in AXES:
        name = getattr(columns, axis)
        out[axis] = (pd.to_numeric(raw[name], errors="coerce").astype(float)
                     if name in raw.columns else np.nan)
    have = {axis: getattr(columns, axis) in raw.columns for axis in AXES}
    if not have["tokens"] and have["compute"] and have["params"]:
        out["tokens"] = out["compute"] / (6.0 * out["params"])
        derived.append("tokens = compute / (6 · params)")
    if not have["compute"] and have["tokens"] and have["params"]:
        out["compute"] = 6.0 * out["params"] * out["tokens"]
        derived.append("compute = 6 · params · tokens")
    for axis in need:
        if out[axis].isna().all():
            flag = f"--{axis}"
            raise FitError(_missing(raw, getattr(columns, axis), flag, axis))

    if columns.group in raw.columns:
        out["group"] = raw[columns.group].astype(str)
    else:
        out["group"] = [f"row{i}" for i in range(len(raw))]
    if columns.step in raw.columns:
        out["step"] = pd.to_numeric(raw[columns.step], errors="coerce").astype(float)
    else:
        out["step"] = out["tokens"].where(out["tokens"].notna(), out["compute"])
    if columns.final in raw.columns:
        flags = raw[columns.final].map(_as_bool)
        finished = set(out.loc[flags.fillna(False).astype(bool), "group"])
    else:
        finished = set(out["group"])

    n_raw = len(out)
    out = out[out["loss"].notna()]
    n_nan_loss = n_raw - len(out)
    zero = np.zeros(len(out), dtype=bool)
    for axis in ("compute", "tokens"):
        zero |= (out[axis] == 0).to_numpy()
    out = out[~zero].copy()
    for axis in ("loss", *need):
        vals = out[axis].to_numpy(dtype=float)
        label = "loss" if axis == "loss" else axis
        src = getattr(columns, axis)
        if np.isnan(vals).any() or np.isinf(vals).any():
            bad = int((~np.isfinite(vals)).sum())
            raise FitError(f"column {src!r} ({label}) has {bad} NaN or infinite value(s)")
        if (vals <= 0).any():
            raise FitError(
                f"column {src!r} ({label}) has {int((vals <= 0).sum())} non-positive value(s); "
                "log-space fits need every value > 0"
            )
    if out.empty:
        raise FitError("no rows with a loss value are left in the table")

    order = out.sort_values(["group", "step"], kind="stable")
    last = ~order["group"].duplicated(keep="last")
    out["final"] = False
    out.loc[order.index[last.to_numpy()], "final"] = True
    out["final"] &= out["group"].isin(finished)
    out = out.reset_index(drop=True)
    out.attrs.update(
        rows_read=n_raw,
        dropped_nan_loss=n_nan_loss,
        dropped_zero_compute=int(zero.sum()),
        derived=derived,
        has_final_column=columns.final in raw.columns,
    )
    return out


def check_named_columns(raw: pd.DataFrame, columns: Columns, axes: tuple[str, ...]) -> None:
    """Raise FitError if a column the user named explicitly for one of `axes` is absent.

    Without this, a mistyped --compute would silently fall back to 6·params·tokens.
    """
    for axis in axes:
        name = getattr(columns, axis)
        if name not in raw.columns:
            raise FitError(_missing(raw, name, f"--{axis}", axis))


def _as_bool(v: object) -> bool | None:
    if isinstance(v, bool | np.bool_):
        return bool(v)
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    return bool(v)


def _missing(raw: pd.DataFrame, name: str, flag: str, axis: str | None = None) -> str:
    what = f" for {axis}" if axis else ""
    hint = ""
    if axis == "tokens":
        hint = " (or give --compute and --params to derive it)"
    elif axis == "compute":
        hint = " (or give --params and --tokens to derive it)"
    return (
        f"column {name!r}{what} not in table; columns are {list(raw.columns)}. "
        f"Name the right one with {flag}{hint}"
    )
