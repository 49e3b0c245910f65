"""One-variable laws: the pure power law L = a·X^b and the saturating law L = E + A·X^-α."""

from __future__ import annotations

import numpy as np

from analysis.powersum import (
    bootstrap_counts,
    bootstrap_multistart,
    fit_multistart,
    flag_problems,
    gauss_newton_stderr,
    log_predict,
    to_natural,
)
from analysis.result import (
    FitError,
    FitResult,
    apply_bootstrap,
    normal_ci,
    pearson_r,
    percentile_ci,
    r2_score,
    require_count,
    require_points,
)


def power_law(params: dict[str, float], x: np.ndarray) -> np.ndarray:
    """a·x^b."""
    return params["a"] * np.power(x, params["b"])


def saturating_law(params: dict[str, float], x: np.ndarray) -> np.ndarray:
    """E + A·x^-alpha."""
    return params["E"] + params["A"] * np.power(x, -params["alpha"])


def fit_power_law(
    x: np.ndarray,
    loss: np.ndarray,
    *,
    bootstrap: int = 0,
    seed: int = 0,
    ci_level: float = 0.95,
    x_name: str = "x",
    y_name: str = "loss",
) -> FitResult:
    """Least squares of log L on log X: L = a·X^b (b < 0 when loss falls with X).

    stderr is the OLS standard error (a's by the delta method); ci is the bootstrap
    percentile interval when bootstrap > 1, else the Student-t interval (a's from the
    intercept's interval, so it stays positive). pearson_r is that of log X and log L.
    Raises FitError for fewer than 3 points, NaN, non-positive values or a constant X.
    Any positive quantity can stand in for L (y_name names it); a non-negative exponent is
    flagged only when y_name is "loss".
    """
    x = require_points(x_name, x)
    loss = require_points(y_name, loss)
    if len(x) != len(loss):
        raise ValueError("x and loss must have the same length")
    require_count(len(x), 3, "a power-law fit (2 parameters)")
    lx, ly = np.log(x), np.log(loss)
    sxx = float(np.sum((lx - lx.mean()) ** 2))
    if sxx <= 1e-12 * max(1.0, float(np.sum(lx * lx))):
        raise FitError(f"{x_name} is constant: a power law needs at least two distinct values")
    b = float(np.sum((lx - lx.mean()) * (ly - ly.mean())) / sxx)
    c = float(ly.mean() - b * lx.mean())
    pred = c + b * lx
    resid = ly - pred
    n = len(x)
    s2 = float(resid @ resid) / (n - 2)
    se_b = np.sqrt(s2 / sxx)
    se_c = np.sqrt(s2 * (1.0 / n + lx.mean() ** 2 / sxx))
    params = {"a": float(np.exp(c)), "b": b}
    stderr = {"a": float(params["a"] * se_c), "b": float(se_b)}
    t_ci = normal_ci({"c": c, "b": b}, {"c": se_c, "b": se_b}, ci_level, dof=n - 2)
    result = FitResult(
        form="power",
        params=params,
        stderr=stderr,
        ci={"a": [float(np.exp(v)) for v in t_ci["c"]], "b": t_ci["b"]},
        r2=r2_score(ly, pred),
        pearson_r=pearson_r(lx, ly),
        pearson_r_of=f"log {x_name} vs log {y_name}",
        n_points=n,
        residuals=resid,
        converged=True,
        model=power_law,
        x_names=(x_name,),
        ci_level=ci_level,
        ci_method=f"Student t, {n - 2} degrees of freedom",
        stderr_method="ordinary least squares in log-log space",
        diagnostics={"method": "closed-form least squares"},
    )
    if bootstrap > 1:
        samples = bootstrap_loglog(x, loss, bootstrap, seed)
        result.bootstrap_samples = samples[np.isfinite(samples[:, 1])]
        result.ci = percentile_ci(samples, ["a", "b"], ci_level)
        result.ci_method = f"bootstrap percentile, {bootstrap} resamples, seed {seed}"
    if b >= 0 and y_name == "loss":
        result.warn(f"exponent b={b:.4g} is not negative: loss does not fall with {x_name}")
    return result


def bootstrap_loglog(x: np.ndarray, y: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, 2) rows [a, b] of y = a·x^b refitted by log-log least squares on each
    resample of the points; NaN rows for resamples that drew a single distinct x."""
    lx, ly = np.log(x), np.log(y)
    w = bootstrap_counts(len(lx), resamples, seed)
    sw = w.sum(axis=1, keepdims=True)
    mx = (w @ lx)[:, None] / sw
    my = (w @ ly)[:, None] / sw
    dx = lx[None, :] - mx
    with np.errstate(invalid="ignore", divide="ignore"):
        b = np.sum(w * dx * (ly[None, :] - my), axis=1) / np.sum(w * dx * dx, axis=1)
    b[~np.isfinite(b)] = np.nan
    return np.column_stack([np.exp(my[:, 0] - b * mx[:, 0]), b])


def saturating_starts(log_x: np.ndarray, log_loss: np.ndarray) -> np.ndarray:
    """Starting points [e, a, alpha] spread over floor fractions and exponents.

    Each start puts the floor E at a fraction of the lowest loss and picks A so that the
    curve passes through the median point, which keeps the grid valid for any units of X.
    """
    loss = np.exp(log_loss)
    x_mid = float(np.median(log_x))
    l_mid = float(np.median(loss))
    starts = []
    for frac in (0.01, 0.3, 0.6, 0.9, 0.98):
        e0 = frac * float(loss.min())
        for alpha in (0.01, 0.03, 0.1, 0.3, 0.6, 1.0, 2.0):
            a0 = np.log(max(l_mid - e0, 1e-6 * l_mid)) + alpha * x_mid
            starts.append((np.log(e0), a0, alpha))
    return np.array(starts)


def fit_saturating(
    x: np.ndarray,
    loss: np.ndarray,
    *,
    delta: float | None = None,
    bootstrap: int = 0,
    seed: int = 0,
    ci_level: float = 0.95,
    x_name: str = "x",
    max_iter: int = 1000,
) -> FitResult:
    """Fit L = E + A·X^-α on log residuals (least squares, or Huber with threshold delta).

    Multi-start L-BFGS in the log-sum-exp form; bootstrap resamples are warm-started from
    the full-data optimum. stderr is the bootstrap standard deviation when bootstrap > 1,
    else the Gauss-Newton approximation. pearson_r is that of log X and log L, as for the
    pure power law. Raises FitError for fewer than 4 points, NaN or non-positive values.
    """
    x = require_points(x_name, x)
    loss = require_points("loss", loss)
    if len(x) != len(loss):
        raise ValueError("x and loss must have the same length")
    require_count(len(x), 4, "a saturating power-law fit (3 parameters)")
    if np.ptp(np.log(x)) == 0:
        raise FitError(f"{x_name} is constant: a power law needs at least two distinct values")
    log_x = np.log(x)[None, :]
    log_loss = np.log(loss)
    fit = fit_multistart(log_x, log_loss, saturating_starts(log_x[0], log_loss), delta, max_iter)
    nat = to_natural(fit.x, 1)
    names = ["E", "A", "alpha"]
    params = dict(zip(names, nat.tolist(), strict=True))
    log_pred = log_predict(fit.x, log_x)
    gn = dict(zip(names, gauss_newton_stderr(fit.x, log_x, log_loss).tolist(), strict=True))
    diag = fit.diagnostics()
    diag["huber_delta"] = delta
    result = FitResult(
        form="saturating",
        params=params,
        stderr=gn,
        ci=normal_ci(params, gn, ci_level),
        r2=r2_score(log_loss, log_pred),
        pearson_r=pearson_r(log_x[0], log_loss),
        pearson_r_of=f"log {x_name} vs log loss",
        n_points=len(x),
        residuals=log_loss - log_pred,
        converged=bool(fit.batch.converged[fit.best]),
        model=saturating_law,
        x_names=(x_name,),
        ci_level=ci_level,
        ci_method="normal approximation (Gauss-Newton)",
        stderr_method="Gauss-Newton s²(JᵀJ)⁻¹",
        diagnostics=diag,
    )
    if bootstrap > 1:
        boot = bootstrap_multistart(log_x, log_loss, fit.x, delta, bootstrap, seed, max_iter)
        samples = np.atleast_2d(to_natural(boot.x, 1))
        apply_bootstrap(result, samples, boot.converged, names, ci_level, bootstrap, seed)
    flag_problems(result, diag, loss, {"A·X^-alpha": params["A"] * x ** -params["alpha"]})
    return result
