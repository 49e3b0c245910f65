"""The result every fit returns, the error hopeless input raises, and shared statistics."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class FitError(ValueError):
    """Input no fit can use: too few points, NaN, or values that must be positive and are not."""


class FitWarning(UserWarning):
    """A fit that returned numbers which should not be trusted (not converged, degenerate)."""


@dataclass
class FitResult:
    """Parameters, uncertainty and diagnostics of one fit.

    `residuals` are log(observed) - log(predicted) in the order of the fitted points; `r2` is
    the coefficient of determination of log loss (or log N_opt for allocation fits). `ci`
    maps each parameter to [lo, hi] at `ci_level`. `converged` is False, and `warnings`
    says why, whenever the numbers should not be trusted.
    """

    form: str
    params: dict[str, float]
    stderr: dict[str, float]
    ci: dict[str, list[float]]
    r2: float
    pearson_r: float
    pearson_r_of: str
    n_points: int
    residuals: np.ndarray
    converged: bool
    model: Callable[..., np.ndarray] | None = None
    x_names: tuple[str, ...] = ()
    ci_level: float = 0.95
    ci_method: str = ""
    stderr_method: str = ""
    diagnostics: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    bootstrap_samples: np.ndarray | None = None  # (resamples, parameters) in params order
    extras: dict[str, Any] = field(default_factory=dict)

    def predict(self, *xs: np.ndarray) -> np.ndarray:
        """Loss (or fitted quantity) predicted by the fitted parameters at xs."""
        if self.model is None:
            raise TypeError(f"a {self.form} fit has no prediction function")
        return self.model(self.params, *[np.asarray(x, dtype=float) for x in xs])

    def predict_band(self, *xs: np.ndarray, level: float | None = None) -> tuple[np.ndarray, ...]:
        """Pointwise percentile band of the prediction over the bootstrap resamples.

        Returns (lo, hi), or () when the fit has no bootstrap samples.
        """
        if self.bootstrap_samples is None or len(self.bootstrap_samples) < 2:
            return ()
        level = self.ci_level if level is None else level
        names = list(self.params)
        preds = np.array(
            [self.model(dict(zip(names, row, strict=True)), *xs) for row in self.bootstrap_samples]
        )
        tail = 50 * (1 - level)
        lo, hi = np.nanpercentile(preds, [tail, 100 - tail], axis=0)
        return lo, hi

    def warn(self, message: str) -> None:
        """Record a reason to distrust this fit and emit it as a FitWarning."""
        self.warnings.append(message)
        warnings.warn(f"{self.form} fit: {message}", FitWarning, stacklevel=3)

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON view: params at top level plus r2, pearson_r, ci, n_points and the rest."""
        out: dict[str, Any] = {"form": self.form}
        out.update({k: _num(v) for k, v in self.params.items()})
        out.update(
            {
                "r2": _num(self.r2),
                "pearson_r": _num(self.pearson_r),
                "pearson_r_of": self.pearson_r_of,
                "n_points": int(self.n_points),
                "ci": {k: [_num(v[0]), _num(v[1])] for k, v in self.ci.items()},
                "ci_level": self.ci_level,
                "ci_method": self.ci_method,
                "stderr": {k: _num(v) for k, v in self.stderr.items()},
                "stderr_method": self.stderr_method,
                "converged": bool(self.converged),
                "warnings": list(self.warnings),
                "diagnostics": _plain(self.diagnostics),
                "residuals": [_num(r) for r in np.asarray(self.residuals, dtype=float)],
            }
        )
        out.update(_plain(self.extras))
        return out


def _num(v: Any) -> float | None:
    """JSON has no NaN: map non-finite numbers to null."""
    v = float(v)
    return v if np.isfinite(v) else None


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_plain(v) for v in obj.tolist()]
    if isinstance(obj, np.bool_ | bool):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return _num(obj)
    return obj


def require_points(name: str, values: np.ndarray, *, positive: bool = True) -> np.ndarray:
    """Return values as a float array, or raise FitError naming `name` if any is NaN/inf/<=0."""
    arr = np.asarray(values, dtype=float)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise FitError(f"{name} has {int(bad.sum())} NaN or infinite value(s)")
    if positive and (arr <= 0).any():
        raise FitError(
            f"{name} has {int((arr <= 0).sum())} non-positive value(s) "
            f"(min {arr.min():.4g}); a log-space fit needs every value > 0"
        )
    return arr


def require_count(n: int, minimum: int, what: str) -> None:
    """Raise FitError unless n >= minimum."""
    if n < minimum:
        raise FitError(f"too few points for {what}: got {n}, need at least {minimum}")


def r2_score(observed: np.ndarray, predicted: np.ndarray) -> float:
    """Coefficient of determination 1 - SS_res/SS_tot (NaN when observed is constant)."""
    observed = np.asarray(observed, dtype=float)
    ss_tot = float(np.sum((observed - observed.mean()) ** 2))
    if ss_tot == 0:
        return float("nan")
    return 1.0 - float(np.sum((observed - predicted) ** 2)) / ss_tot


def pearson_r(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of a and b (NaN when either is constant)."""
    a = np.asarray(a, dtype=float) - np.mean(a)
    b = np.asarray(b, dtype=float) - np.mean(b)
    denom = np.sqrt(np.sum(a * a) * np.sum(b * b))
    return float(np.sum(a * b) / denom) if denom > 0 else float("nan")


def percentile_ci(samples: np.ndarray, names: list[str], level: float) -> dict[str, list[float]]:
    """Percentile interval per column of samples (resamples, parameters), NaN rows ignored."""
    tail = 50 * (1 - level)
    lo, hi = np.nanpercentile(samples, [tail, 100 - tail], axis=0)
    return {n: [float(lo[i]), float(hi[i])] for i, n in enumerate(names)}


def apply_bootstrap(result: FitResult, samples: np.ndarray, converged: np.ndarray,
                    names: list[str], level: float, resamples: int, seed: int) -> None:
    """Percentile intervals and standard deviations from bootstrap refits (natural-scale
    parameters, one row per resample) into ``result``; refits that did not converge are left
    out, and a warning is added when more than 10% did not."""
    samples = np.array(samples, dtype=float)
    samples[~converged] = np.nan
    result.bootstrap_samples = samples[converged]
    result.ci = percentile_ci(samples, names, level)
    result.ci_method = f"bootstrap percentile, {resamples} resamples, seed {seed}"
    result.stderr = dict(zip(names, np.nanstd(samples, axis=0, ddof=1).tolist(), strict=True))
    result.stderr_method = "bootstrap standard deviation"
    frac = float(converged.mean())
    result.diagnostics["bootstrap_converged_fraction"] = frac
    if frac < 0.9:
        result.warn(f"only {frac:.0%} of bootstrap refits converged")


def normal_ci(
    params: dict[str, float], stderr: dict[str, float], level: float, dof: int | None = None
) -> dict[str, list[float]]:
    """Symmetric interval params ± t·stderr (Student t with dof, or normal when dof is None)."""
    from scipy import stats

    q = stats.t.ppf(0.5 + level / 2, dof) if dof else stats.norm.ppf(0.5 + level / 2)
    return {k: [v - q * stderr[k], v + q * stderr[k]] for k, v in params.items()}
