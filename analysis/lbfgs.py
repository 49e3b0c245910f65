"""L-BFGS run on many independent problems at once, one numpy call per iteration.

The Chinchilla fit starts L-BFGS from thousands of grid points and the bootstrap refits a
thousand resamples. Each problem is tiny (5 parameters, a few hundred points), so a per-problem
`scipy.optimize.minimize` spends nearly all its time in Python overhead. Here every iteration
evaluates the objective of all still-active problems in one vectorised call instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Termination codes, one per problem.
GRADIENT_TOL = 0  # gradient max-norm below gtol
FUNCTION_TOL = 1  # relative decrease below ftol
STALLED = 2  # no decrease along steepest descent even at the smallest step: a kink minimum
MAX_ITER = 3  # ran out of iterations: not converged

STATUS_TEXT = {
    GRADIENT_TOL: "gradient below tolerance",
    FUNCTION_TOL: "relative decrease below tolerance",
    STALLED: "no decrease possible along steepest descent",
    MAX_ITER: "iteration limit reached",
}

# objective(x, rows) -> (f, g): x is (k, p); rows (k,) says which problems the rows of x are.
BatchedObjective = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class BatchResult:
    """Per-problem outcome of `minimize_batched`; every array has one entry per problem."""

    x: np.ndarray  # (s, p) final parameters
    fun: np.ndarray  # (s,) final objective
    grad_norm: np.ndarray  # (s,) max-norm of the final gradient
    n_iter: np.ndarray  # (s,) iterations taken
    status: np.ndarray  # (s,) termination code, see STATUS_TEXT

    @property
    def converged(self) -> np.ndarray:
        return self.status != MAX_ITER


def minimize_batched(
    objective: BatchedObjective,
    x0: np.ndarray,
    *,
    max_iter: int = 500,
    memory: int = 10,
    gtol: float = 1e-9,
    ftol: float = 1e-10,
    max_backtracks: int = 40,
    armijo: float = 1e-4,
) -> BatchResult:
    """Minimise s independent smooth problems with L-BFGS and a backtracking Armijo search.

    Problem i starts at x0[i]. A problem stops when its gradient max-norm falls below gtol,
    when a quasi-Newton step lowers its objective by less than ftol times its value, when no step along
    steepest descent lowers it (status STALLED, which is how a Huber objective with a tiny
    delta ends at a kink), or after max_iter iterations (status MAX_ITER: not converged).
    """
    x = np.array(x0, dtype=float, copy=True)
    if x.ndim != 2:
        raise ValueError(f"x0 must be 2-D (problems, parameters), got shape {x.shape}")
    s, p = x.shape
    all_rows = np.arange(s)
    f, g = objective(x, all_rows)
    f = np.asarray(f, dtype=float).copy()
    g = np.asarray(g, dtype=float).copy()

    hist_s = np.zeros((s, memory, p))
    hist_y = np.zeros((s, memory, p))
    hist_rho = np.zeros((s, memory))  # 0 marks an empty slot, which the two-loop then skips
    n_iter = np.zeros(s, dtype=int)
    status = np.full(s, MAX_ITER)
    active = np.abs(g).max(axis=1) > gtol
    status[~active] = GRADIENT_TOL
    # A problem whose quasi-Newton step failed retries once with plain steepest descent.
    steepest = np.zeros(s, dtype=bool)

    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        gi, fi, xi = g[idx], f[idx], x[idx]
        d = -_two_loop(gi, hist_s[idx], hist_y[idx], hist_rho[idx])
        fresh = (hist_rho[idx, 0] == 0) | steepest[idx]
        # Without curvature information, scale steepest descent to a unit-length first step.
        gnorm = np.linalg.norm(gi, axis=1)
        d[fresh] = -gi[fresh] / np.maximum(gnorm[fresh], 1e-300)[:, None]
        slope = np.einsum("ij,ij->i", gi, d)
        uphill = slope >= 0
        d[uphill] = -gi[uphill] / np.maximum(gnorm[uphill], 1e-300)[:, None]
        slope[uphill] = -gnorm[uphill]

        step = np.ones(idx.size)
        accepted = np.zeros(idx.size, dtype=bool)
        f_new = fi.copy()
        g_new = gi.copy()
        pending = np.arange(idx.size)
        for _ in range(max_backtracks):
            trial = xi[pending] + step[pending, None] * d[pending]
            ft, gt = objective(trial, idx[pending])
            ok = np.isfinite(ft) & (ft <= fi[pending] + armijo * step[pending] * slope[pending])
            done = pending[ok]
            accepted[done] = True
            f_new[done] = ft[ok]
            g_new[done] = gt[ok]
            pending = pending[~ok]
            if pending.size == 0:
                break
            step[pending] *= 0.5

        n_iter[idx] += 1
        failed = ~accepted
        # A failed quasi-Newton step gets one steepest-descent retry; a failed
        # steepest-descent step means no representable step lowers the objective.
        retry = failed & ~steepest[idx]
        stuck = failed & steepest[idx]
        steepest[idx[retry]] = True
        hist_rho[idx[retry]] = 0.0
        status[idx[stuck]] = STALLED
        active[idx[stuck]] = False

        a = np.flatnonzero(accepted)
        if a.size == 0:
            continue
        ia = idx[a]
        s_vec = step[a, None] * d[a]
        y_vec = g_new[a] - gi[a]
        sy = np.einsum("ij,ij->i", s_vec, y_vec)
        # Skip the memory update where curvature is not positive: keeps H positive definite.
        good = sy > 1e-12 * np.linalg.norm(s_vec, axis=1) * np.linalg.norm(y_vec, axis=1)
        ig = ia[good]
        hist_s[ig] = np.roll(hist_s[ig], 1, axis=1)
        hist_y[ig] = np.roll(hist_y[ig], 1, axis=1)
        hist_rho[ig] = np.roll(hist_rho[ig], 1, axis=1)
        hist_s[ig, 0] = s_vec[good]
        hist_y[ig, 0] = y_vec[good]
        hist_rho[ig, 0] = 1.0 / sy[good]
        steepest[ia] = False

        decrease = fi[a] - f_new[a]
        x[ia] = xi[a] + s_vec
        f[ia] = f_new[a]
        g[ia] = g_new[a]
        small_g = np.abs(g_new[a]).max(axis=1) <= gtol
        # A steepest-descent step of unit length can gain little and still be far from the
        # optimum, so only a quasi-Newton step counts towards the decrease test.
        small_f = (decrease <= ftol * np.maximum(np.abs(f_new[a]), 1e-300)) & ~fresh[a]
        status[ia[small_f]] = FUNCTION_TOL
        status[ia[small_g]] = GRADIENT_TOL
        active[ia[small_g | small_f]] = False

    return BatchResult(
        x=x, fun=f, grad_norm=np.abs(g).max(axis=1), n_iter=n_iter, status=status
    )


def _two_loop(g: np.ndarray, hs: np.ndarray, hy: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """Return H·g for each row, H the L-BFGS inverse-Hessian estimate (newest pair first)."""
    q = g.copy()
    m = hs.shape[1]
    alpha = np.zeros((g.shape[0], m))
    for i in range(m):
        alpha[:, i] = rho[:, i] * np.einsum("ij,ij->i", hs[:, i], q)
        q -= alpha[:, i, None] * hy[:, i]
    yy = np.einsum("ij,ij->i", hy[:, 0], hy[:, 0])
    with np.errstate(divide="ignore", invalid="ignore"):
        gamma = np.where(rho[:, 0] > 0, 1.0 / (rho[:, 0] * yy), 1.0)
    r = gamma[:, None] * q
    for i in range(m - 1, -1, -1):
        beta = rho[:, i] * np.einsum("ij,ij->i", hy[:, i], r)
        r += (alpha[:, i] - beta)[:, None] * hs[:, i]
    return r
