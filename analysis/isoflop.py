"""Compute-optimal allocation N_opt = k_N·C^a and D_opt = k_D·C^b.

Approach 2 (IsoFLOP): group final points into compute budgets, locate the loss minimum of
each budget along log N (and along log D), then regress log N_opt and log D_opt on log C.
The minimum is the vertex of a parabola in log N (Chinchilla) or the minimum of an Akima
interpolation of log loss over a fine grid (Porian et al. 2024), which stays faithful when a
budget's points reach far from the optimum, where a parabola is biased.

Approach 1 (envelope): the N and D of the runs on the lower envelope of loss against
compute, regressed on C.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.interpolate import Akima1DInterpolator

from analysis.powerlaw import bootstrap_loglog
from analysis.result import (
    FitError,
    FitResult,
    normal_ci,
    pearson_r,
    percentile_ci,
    r2_score,
    require_count,
    require_points,
)

METHODS = ("parabola", "akima")
PARAMS = ["a", "b", "k_N", "k_D"]


def optimal_allocation(params: dict[str, float], c: np.ndarray) -> np.ndarray:
    """N_opt = k_N·C^a (D_opt is k_D·C^b)."""
    return params["k_N"] * np.power(c, params["a"])


def group_budgets(compute: np.ndarray, rtol: float = 0.05) -> np.ndarray:
    """Label each compute value with its budget: values within rtol of their neighbour join.

    Returns, per value, the geometric mean of its group, so a sweep whose runs land a few
    percent off their nominal budget still forms clean IsoFLOP curves.
    """
    c = require_points("compute", compute)
    order = np.argsort(c)
    lc = np.log(c[order])
    new = np.concatenate([[True], np.diff(lc) > np.log1p(rtol)])
    ids = np.cumsum(new) - 1
    centers = np.exp(np.bincount(ids, weights=lc) / np.bincount(ids))
    out = np.empty_like(c)
    out[order] = centers[ids]
    return out


def curve_minimum(log_x: np.ndarray, loss: np.ndarray, method: str) -> tuple[float, float] | None:
    """(log x, loss) at the minimum of one IsoFLOP curve, or None when it is not interior.

    Points must be sorted by log_x with distinct values. parabola: vertex of the least-squares
    quadratic of loss in log x, rejected when the curvature is not positive or the vertex
    lies outside the sampled range. akima: minimum of an Akima interpolation of log loss on
    25 grid points per interval, rejected at either end of the range.
    """
    if method == "parabola":
        c2, c1, c0 = np.polyfit(log_x, loss, 2)
        if c2 <= 0:
            return None
        v = -c1 / (2 * c2)
        if not (log_x[0] <= v <= log_x[-1]):
            return None
        return float(v), float(c0 + c1 * v + c2 * v * v)
    if method == "akima":
        grid = np.linspace(log_x[0], log_x[-1], (len(log_x) - 1) * 25)
        curve = Akima1DInterpolator(log_x, np.log(loss))(grid)
        i = int(np.argmin(curve))
        if i == 0 or i == len(grid) - 1:
            return None
        return float(grid[i]), float(np.exp(curve[i]))
    raise ValueError(f"unknown optimum method {method!r}; choose one of {METHODS}")


def curve_points(x: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct log x with the lowest loss at each (repeated sizes are seeds)."""
    order = np.lexsort((loss, x))
    xs, ls = x[order], loss[order]
    first = np.concatenate([[True], xs[1:] != xs[:-1]])
    return np.log(xs[first]), ls[first]


def _budget_minima(
    n: np.ndarray, d: np.ndarray, loss: np.ndarray, method: str
) -> tuple[tuple[float, float] | None, tuple[float, float] | None, int]:
    """Minimum along log N, minimum along log D, and the number of distinct sizes."""
    ln, ll = curve_points(n, loss)
    if len(ln) < 3:
        return None, None, len(ln)
    ld, ldl = curve_points(d, loss)
    d_min = curve_minimum(ld, ldl, method) if len(ld) >= 3 else None
    return curve_minimum(ln, ll, method), d_min, len(ln)


def budget_arrays(df: pd.DataFrame, rtol: float) -> list[tuple[float, np.ndarray, ...]]:
    """(budget, params, tokens, loss) arrays for each compute budget, in increasing order."""
    budgets = group_budgets(df["compute"].to_numpy(dtype=float), rtol)
    out = []
    for c in np.unique(budgets):
        g = df[budgets == c]
        out.append((float(c), *(g[k].to_numpy(dtype=float) for k in ("params", "tokens", "loss"))))
    return out


def isoflop_optima(
    df: pd.DataFrame, method: str = "parabola", rtol: float = 0.05
) -> pd.DataFrame:
    """One row per compute budget: compute, n_opt, d_opt, loss_opt, n_points, used, note.

    `used` is False (and `note` says why) for a budget with fewer than 3 distinct sizes or
    whose minimum lies at an edge of the sampled sizes.
    """
    if method not in METHODS:
        raise ValueError(f"unknown optimum method {method!r}; choose one of {METHODS}")
    rows = []
    for c, n, d, loss in budget_arrays(df, rtol):
        row = {"compute": c, "n_points": int(len(n)), "n_opt": np.nan, "d_opt": np.nan,
               "loss_opt": np.nan, "used": False, "note": ""}
        n_min, d_min, sizes = _budget_minima(n, d, loss, method)
        if sizes < 3:
            row["note"] = f"{sizes} distinct sizes (need 3)"
        elif n_min is None or d_min is None:
            row["note"] = "minimum at the edge of the sampled range"
        else:
            row.update(n_opt=np.exp(n_min[0]), d_opt=np.exp(d_min[0]), loss_opt=n_min[1],
                       used=True)
        rows.append(row)
    return pd.DataFrame(rows)


def _regress(c: np.ndarray, n: np.ndarray, d: np.ndarray) -> np.ndarray:
    """[a, b, k_N, k_D] from least squares of log N and log D on log C."""
    lc = np.log(c)
    a, ln_kn = np.polyfit(lc, np.log(n), 1)
    b, ln_kd = np.polyfit(lc, np.log(d), 1)
    return np.array([a, b, np.exp(ln_kn), np.exp(ln_kd)])


def fit_isoflop(
    df: pd.DataFrame,
    *,
    method: str = "parabola",
    bootstrap: int = 0,
    seed: int = 0,
    ci_level: float = 0.95,
    rtol: float = 0.05,
) -> FitResult:
    """Approach 2 on standard columns (params, tokens, compute, loss): exponents a and b.

    stderr is the OLS standard error of each exponent; ci is the bootstrap percentile
    interval (points resampled within each budget, optima relocated) when bootstrap > 1,
    else the Student-t interval. Raises FitError when fewer than 3 budgets have an interior
    minimum.
    """
    for col in ("params", "tokens", "compute", "loss"):
        require_points(col, df[col].to_numpy(dtype=float))
    optima = isoflop_optima(df, method, rtol)
    used = optima[optima["used"]]
    require_count(len(used), 3, f"an IsoFLOP fit (budgets with an interior minimum, {method})")
    c, n, d = (used[k].to_numpy(dtype=float) for k in ("compute", "n_opt", "d_opt"))
    est = _regress(c, n, d)
    result = _allocation_result(
        "isoflop", est, c, n, d, ci_level,
        diagnostics={"method": method, "budgets": int(len(optima)), "budgets_used": int(len(used)),
                     "budget_rtol": rtol},
    )
    result.extras["optima"] = optima.to_dict(orient="records")
    skipped = optima[~optima["used"]]
    for _, row in skipped.iterrows():
        result.warn(f"budget C={row['compute']:.3g} skipped: {row['note']}")
    if bootstrap > 1:
        rng = np.random.default_rng(seed)
        keep = set(used["compute"])
        groups = [b for b in budget_arrays(df, rtol) if b[0] in keep]
        samples = np.full((bootstrap, 4), np.nan)
        for i in range(bootstrap):
            pts = []
            for c, n, d, loss in groups:
                pick = rng.integers(0, len(n), len(n))
                nm, dm, _ = _budget_minima(n[pick], d[pick], loss[pick], method)
                if nm is not None and dm is not None:
                    pts.append((c, np.exp(nm[0]), np.exp(dm[0])))
            if len(pts) >= 3:
                samples[i] = _regress(*np.array(pts).T)
        ok = np.isfinite(samples).all(axis=1)
        result.bootstrap_samples = samples[ok]
        result.ci = percentile_ci(samples, PARAMS, ci_level)
        result.ci_method = f"bootstrap percentile, {bootstrap} resamples within budgets, seed {seed}"
        result.diagnostics["bootstrap_valid_fraction"] = float(ok.mean())
        if ok.mean() < 0.9:
            result.warn(f"only {ok.mean():.0%} of bootstrap resamples had 3 usable budgets")
    return result


def fit_envelope_allocation(
    env: pd.DataFrame,
    *,
    bootstrap: int = 0,
    seed: int = 0,
    ci_level: float = 0.95,
    drop_edge_sizes: bool = True,
) -> FitResult:
    """Approach 1 on envelope rows (params, tokens, compute): exponents a and b.

    Uses the N and D of each envelope point as the compute-optimal allocation at its C.
    The smallest and largest sizes are left out when at least 4 sizes are on the envelope:
    they hold the envelope beyond their own optimal range (nothing smaller or larger competes
    there), which flattens the slope. Bootstrap resamples envelope points, the same resample
    for both regressions.
    """
    require_count(len(env), 3, "an envelope allocation fit")
    for col in ("compute", "params", "tokens"):
        require_points(col, env[col].to_numpy(dtype=float))
    sizes = np.unique(env["params"])
    if sizes.size < 2:
        raise FitError("every envelope point comes from one model size: no N_opt trend to fit")
    rows = env
    if drop_edge_sizes and sizes.size >= 4:
        rows = env[(env["params"] > sizes[0]) & (env["params"] < sizes[-1])]
    require_count(len(rows), 3, "an envelope allocation fit (interior sizes)")
    c, n, d = (rows[k].to_numpy(dtype=float) for k in ("compute", "params", "tokens"))
    est = _regress(c, n, d)
    result = _allocation_result(
        "allocation", est, c, n, d, ci_level,
        diagnostics={"method": "lower envelope of loss vs compute (Approach 1)",
                     "sizes_on_envelope": int(sizes.size),
                     "edge_sizes_dropped": bool(len(rows) < len(env))},
    )
    result.extras["fitted_sizes"] = sorted(np.unique(n).tolist())
    if drop_edge_sizes and sizes.size < 4:
        result.warn(f"only {sizes.size} sizes on the envelope: the edge sizes are kept, "
                    "which biases the exponent a low")
    if bootstrap > 1:
        # Same seed, same resamples: each row pairs the N and D regressions of one resample.
        sn = bootstrap_loglog(c, n, bootstrap, seed)
        sd = bootstrap_loglog(c, d, bootstrap, seed)
        samples = np.column_stack([sn[:, 1], sd[:, 1], sn[:, 0], sd[:, 0]])
        result.bootstrap_samples = samples[np.isfinite(samples).all(axis=1)]
        result.ci = percentile_ci(samples, PARAMS, ci_level)
        result.ci_method = f"bootstrap percentile, {bootstrap} resamples, seed {seed}"
    return result


def _allocation_result(form, est, c, n, d, ci_level, diagnostics) -> FitResult:
    lc, lnn, lnd = np.log(c), np.log(n), np.log(d)
    m = len(c)
    params = dict(zip(PARAMS, est.tolist(), strict=True))
    pred_n = np.log(est[2]) + est[0] * lc
    pred_d = np.log(est[3]) + est[1] * lc
    sxx = float(np.sum((lc - lc.mean()) ** 2))
    stderr, log_coef, log_se = {}, {}, {}
    for key, coef, resid in (("a", "k_N", lnn - pred_n), ("b", "k_D", lnd - pred_d)):
        s2 = float(resid @ resid) / (m - 2) if m > 2 else np.nan
        se_log = float(np.sqrt(s2 * (1 / m + lc.mean() ** 2 / sxx)))
        stderr[key] = float(np.sqrt(s2 / sxx))
        stderr[coef] = params[coef] * se_log
        log_coef[coef], log_se[coef] = float(np.log(params[coef])), se_log
    dof = max(m - 2, 1)
    ci = normal_ci({k: params[k] for k in ("a", "b")}, stderr, ci_level, dof=dof)
    # Coefficients get their interval in log space, where the regression is linear.
    for coef, (lo, hi) in normal_ci(log_coef, log_se, ci_level, dof=dof).items():
        ci[coef] = [float(np.exp(lo)), float(np.exp(hi))]
    result = FitResult(
        form=form,
        params=params,
        stderr=stderr,
        ci=ci,
        r2=r2_score(lnn, pred_n),
        pearson_r=pearson_r(lc, lnn),
        pearson_r_of="log compute vs log N_opt",
        n_points=m,
        residuals=lnn - pred_n,
        converged=True,
        model=optimal_allocation,
        x_names=("compute",),
        ci_level=ci_level,
        ci_method=f"Student t, {m - 2} degrees of freedom",
        stderr_method="ordinary least squares in log-log space",
        diagnostics=diagnostics,
    )
    result.extras["b_r2"] = r2_score(lnd, pred_d)
    result.extras["a_plus_b"] = float(est[0] + est[1])
    return result
