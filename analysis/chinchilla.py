"""Chinchilla Approach 3: L(N, D) = E + A/N^α + B/D^β, fitted as Epoch AI refit it.

Huber loss (delta 1e-3 by default) on log residuals, the log-sum-exp form, L-BFGS from the
4,500-point grid of Hoffmann et al., best start kept (Besiroglu et al. 2024, "Chinchilla
Scaling: A replication attempt").
"""

from __future__ import annotations

import numpy as np

from analysis.powersum import (
    bootstrap_multistart,
    fit_multistart,
    flag_problems,
    gauss_newton_stderr,
    log_predict,
    to_natural,
)
from analysis.result import (
    FitResult,
    apply_bootstrap,
    normal_ci,
    pearson_r,
    r2_score,
    require_count,
    require_points,
)

PARAMS = ["E", "A", "B", "alpha", "beta"]


def chinchilla_loss(params: dict[str, float], n: np.ndarray, d: np.ndarray) -> np.ndarray:
    """E + A/N^alpha + B/D^beta."""
    return (
        params["E"]
        + params["A"] * np.power(n, -params["alpha"])
        + params["B"] * np.power(d, -params["beta"])
    )


def start_grid() -> np.ndarray:
    """Hoffmann et al.'s grid as optimiser vectors [e, a, b, alpha, beta] (4,500 starts)."""
    alpha = np.arange(0, 2.5, 0.5)
    beta = np.arange(0, 2.5, 0.5)
    e = np.arange(-1, 1.5, 0.5)
    a = np.arange(0, 30, 5)
    b = np.arange(0, 30, 5)
    mesh = np.meshgrid(e, a, b, alpha, beta, indexing="ij")
    return np.column_stack([m.ravel() for m in mesh])


def fit_chinchilla(
    n: np.ndarray,
    d: np.ndarray,
    loss: np.ndarray,
    *,
    delta: float | None = 1e-3,
    bootstrap: int = 0,
    seed: int = 0,
    ci_level: float = 0.95,
    starts: np.ndarray | None = None,
    max_iter: int = 1000,
    workers: int = 1,
) -> FitResult:
    """Fit E + A/N^α + B/D^β to (N, D, loss) and return params E, A, B, alpha, beta.

    With bootstrap > 1, resamples of the points are refitted warm-started from the full-data
    optimum; stderr is then their standard deviation and ci their percentile interval.
    Without it, stderr and ci come from the least-squares (Gauss-Newton) approximation.
    workers > 1 spreads the starts and the resamples over that many processes.
    Raises FitError for fewer than 6 points or any NaN or non-positive value.
    """
    n = require_points("params (N)", n)
    d = require_points("tokens (D)", d)
    loss = require_points("loss", loss)
    if not (len(n) == len(d) == len(loss)):
        raise ValueError("n, d and loss must have the same length")
    require_count(len(loss), 6, "a Chinchilla fit (5 parameters)")
    log_x = np.log(np.vstack([n, d]))
    log_loss = np.log(loss)
    grid = start_grid() if starts is None else np.asarray(starts, dtype=float)

    fit = fit_multistart(log_x, log_loss, grid, delta, max_iter=max_iter, workers=workers)
    nat = to_natural(fit.x, 2)  # [E, A, alpha, B, beta]
    params = dict(zip(PARAMS, nat[[0, 1, 3, 2, 4]].tolist(), strict=True))
    log_pred = log_predict(fit.x, log_x)
    diag = fit.diagnostics()
    funs = fit.batch.fun
    diag["starts_at_best"] = int(np.sum(funs <= fit.fun * (1 + 1e-6) + 1e-15))
    diag["huber_delta"] = delta

    gn = gauss_newton_stderr(fit.x, log_x, log_loss)
    gn = dict(zip(PARAMS, gn[[0, 1, 3, 2, 4]].tolist(), strict=True))
    result = FitResult(
        form="chinchilla",
        params=params,
        stderr=gn,
        ci=normal_ci(params, gn, ci_level),
        r2=r2_score(log_loss, log_pred),
        pearson_r=pearson_r(log_pred, log_loss),
        pearson_r_of="log predicted vs log observed loss",
        n_points=len(loss),
        residuals=log_loss - log_pred,
        converged=bool(fit.batch.converged[fit.best]),
        model=chinchilla_loss,
        x_names=("params", "tokens"),
        ci_level=ci_level,
        ci_method="normal approximation (Gauss-Newton)",
        stderr_method="Gauss-Newton s²(JᵀJ)⁻¹ at the Huber optimum",
        diagnostics=diag,
    )
    if bootstrap > 1:
        boot = bootstrap_multistart(log_x, log_loss, fit.x, delta, bootstrap, seed, max_iter,
                                    workers)
        samples = to_natural(boot.x, 2)[:, [0, 1, 3, 2, 4]]
        apply_bootstrap(result, samples, boot.converged, PARAMS, ci_level, bootstrap, seed)
    terms = {"A/N^alpha": params["A"] * n ** -params["alpha"],
             "B/D^beta": params["B"] * d ** -params["beta"]}
    flag_problems(result, fit.diagnostics(), loss, terms)
    return result
