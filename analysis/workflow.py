"""From a standard table to a finished fit: which points, which fit, the extrapolation check.

`run_fit` is what `polar-analyze fit` does before it writes anything; it is a pure function
of the table and a `FitSpec`, so notebooks can call it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from analysis.chinchilla import fit_chinchilla
from analysis.envelope import final_points, lower_envelope
from analysis.extrapolate import extrapolation_summary, split_largest
from analysis.isoflop import fit_envelope_allocation, fit_isoflop, isoflop_optima
from analysis.powerlaw import fit_power_law, fit_saturating
from analysis.result import FitError, FitResult

FORMS = ("power", "saturating", "chinchilla", "isoflop", "allocation")
X_AXES = ("compute", "params", "tokens")


@dataclass(frozen=True)
class FitSpec:
    """What to fit. None for envelope/final_only/huber_delta means the form's default."""

    form: str
    x: str = "compute"
    envelope: bool | None = None
    final_only: bool | None = None
    holdout_largest: int = 0
    bootstrap: int = 200
    seed: int = 0
    ci_level: float = 0.95
    huber_delta: float | None = None
    optimum: str = "parabola"
    budget_rtol: float = 0.05
    workers: int = 1

    def resolved(self) -> FitSpec:
        """Fill the defaults: loss-vs-compute fits use the lower envelope of all learning
        curves; fits against params or tokens, Chinchilla and IsoFLOP use final points;
        Chinchilla uses Huber delta 1e-3, the saturating law least squares."""
        if self.form not in FORMS:
            raise FitError(f"unknown form {self.form!r}; choose one of {', '.join(FORMS)}")
        if self.x not in X_AXES:
            raise FitError(f"unknown x axis {self.x!r}; choose one of {', '.join(X_AXES)}")
        one_var = self.form in ("power", "saturating")
        envelope = self.envelope
        if envelope is None:
            envelope = self.form == "allocation" or (one_var and self.x == "compute")
        final_only = self.final_only
        if final_only is None:
            final_only = not (envelope or self.form == "allocation")
        delta = self.huber_delta
        if delta is None and self.form == "chinchilla":
            delta = 1e-3
        if envelope and not one_var and self.form != "allocation":
            raise FitError(f"--envelope applies to power and saturating fits, not {self.form}")
        if self.form == "allocation" and not envelope:
            raise FitError("the allocation fit (Approach 1) is defined on the envelope")
        return replace(self, envelope=envelope, final_only=final_only, huber_delta=delta)

    def needed_axes(self) -> tuple[str, ...]:
        """Standard columns this fit reads besides loss."""
        if self.form in ("power", "saturating"):
            return (self.x, "compute") if self.envelope and self.x != "compute" else (self.x,)
        if self.form == "allocation":
            return ("params", "tokens", "compute")
        return ("params", "tokens") if self.form == "chinchilla" else X_AXES


@dataclass
class FitRun:
    """A fit together with the points it used, for the report and the plots."""

    spec: FitSpec
    result: FitResult
    table: pd.DataFrame  # every usable row of the table, standard columns
    fitted: pd.DataFrame  # the rows the fit used
    heldout: pd.DataFrame | None = None  # targets of the extrapolation check, with predictions
    notes: list[str] = field(default_factory=list)


def select_points(df: pd.DataFrame, spec: FitSpec) -> pd.DataFrame:
    """The rows a resolved spec fits: final points and/or the lower envelope along compute."""
    rows = final_points(df) if spec.final_only else df
    if spec.envelope:
        rows = lower_envelope(rows, "compute")
    return rows


def run_fit(table: pd.DataFrame, spec: FitSpec) -> FitRun:
    """Fit `table` (from `load.standardize`) as `spec` says; hold out the largest if asked."""
    spec = spec.resolved()
    notes = []
    train, held = table, None
    if spec.holdout_largest:
        by = "compute" if spec.form == "isoflop" else "params"
        if spec.form == "isoflop":
            held_budgets = _largest_budgets(table, spec)
            mask = table["compute"].isin(held_budgets)
            train, held = table[~mask].reset_index(drop=True), table[mask].reset_index(drop=True)
        else:
            train, held = split_largest(table, spec.holdout_largest, by=by)
        notes.append(
            f"held out the {spec.holdout_largest} largest {by} value(s): {len(held)} rows"
        )
    fitted = select_points(train, spec)
    result = _fit(fitted, spec)
    run = FitRun(spec=spec, result=result, table=table, fitted=fitted, notes=notes)
    if held is not None:
        run.heldout = _predict_heldout(result, held, spec)
        result.extras["extrapolation"] = extrapolation_summary(run.heldout)
    return run


def _fit(rows: pd.DataFrame, spec: FitSpec) -> FitResult:
    common = {"bootstrap": spec.bootstrap, "seed": spec.seed, "ci_level": spec.ci_level}
    if spec.form == "power":
        return fit_power_law(rows[spec.x].to_numpy(), rows["loss"].to_numpy(), x_name=spec.x,
                             **common)
    if spec.form == "saturating":
        return fit_saturating(rows[spec.x].to_numpy(), rows["loss"].to_numpy(), x_name=spec.x,
                              delta=spec.huber_delta, **common)
    if spec.form == "chinchilla":
        return fit_chinchilla(rows["params"].to_numpy(), rows["tokens"].to_numpy(),
                              rows["loss"].to_numpy(), delta=spec.huber_delta,
                              workers=spec.workers, **common)
    if spec.form == "isoflop":
        return fit_isoflop(rows, method=spec.optimum, rtol=spec.budget_rtol, **common)
    return fit_envelope_allocation(rows, **common)


def _largest_budgets(table: pd.DataFrame, spec: FitSpec) -> np.ndarray:
    rows = final_points(table) if spec.final_only else table
    optima = isoflop_optima(rows, spec.optimum, spec.budget_rtol)
    budgets = np.sort(optima["compute"].to_numpy())[::-1]
    if len(budgets) - spec.holdout_largest < 3:
        raise FitError(
            f"cannot hold out {spec.holdout_largest} budgets: {len(budgets)} budgets, "
            "an IsoFLOP fit needs 3 left"
        )
    cut = budgets[spec.holdout_largest - 1]
    # Hold out raw rows by their own compute, which may sit within budget_rtol of the label.
    return table.loc[table["compute"] >= cut / (1 + spec.budget_rtol), "compute"].unique()


def _predict_heldout(result: FitResult, held: pd.DataFrame, spec: FitSpec) -> pd.DataFrame:
    """Observed and predicted values (with band) at the held-out targets."""
    if spec.form == "isoflop":
        rows = final_points(held) if spec.final_only else held
        optima = isoflop_optima(rows, spec.optimum, spec.budget_rtol)
        optima = optima[optima["used"]]
        if optima.empty:
            raise FitError("no held-out budget has an interior minimum to compare with")
        c = optima["compute"].to_numpy()
        out = pd.DataFrame({"compute": c, "observed": optima["n_opt"].to_numpy(),
                            "predicted": result.predict(c), "quantity": "N_opt"})
        band = result.predict_band(c)
    else:
        targets = final_points(held) if spec.final_only else _last_rows(held)
        xs = _model_inputs(targets, spec)
        out = targets[["group", "params", "tokens", "compute"]].copy()
        out["observed"] = targets["loss"].to_numpy()
        out["predicted"] = result.predict(*xs)
        out["quantity"] = "loss"
        band = result.predict_band(*xs)
    if band:
        out["predicted_lo"], out["predicted_hi"] = band
    return out.reset_index(drop=True)


def _model_inputs(rows: pd.DataFrame, spec: FitSpec) -> list[np.ndarray]:
    if spec.form == "chinchilla":
        return [rows["params"].to_numpy(), rows["tokens"].to_numpy()]
    return [rows[spec.x].to_numpy()]


def _last_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Each run's last row with a loss (its latest evaluation, finished or not)."""
    order = df.sort_values(["group", "step"], kind="stable")
    return order[~order["group"].duplicated(keep="last")].reset_index(drop=True)
