"""Loss models L = E + Σ_k A_k·X_k^(-α_k) fitted on log loss, many starts and resamples at once.

K = 1 is the saturating power law, K = 2 the Chinchilla form. The optimiser works on
x = [e, a_1..a_K, α_1..α_K] with E = exp(e), A_k = exp(a_k), and predicts
log L̂ = logsumexp(e, a_1 - α_1·log X_1, ..., a_K - α_K·log X_K), the form Hoffmann et al.
and Epoch AI use: it keeps E and A_k positive without bounds and is numerically stable.
The objective is Σ_i w_i·h(log L̂_i - log L_i), h the Huber loss with threshold delta, or
½r² when delta is None. Per-problem weights w make a bootstrap resample one more problem in
the same batched L-BFGS run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.lbfgs import STATUS_TEXT, BatchResult, minimize_batched
from analysis.result import FitResult


class PowerSumObjective:
    """Batched objective and analytic gradient for `minimize_batched`.

    log_x is (K, n), log_loss (n,). weights, when given, is (problems, n) and row r of the
    batch uses weights[r]; otherwise every point has weight 1.
    """

    def __init__(
        self,
        log_x: np.ndarray,
        log_loss: np.ndarray,
        delta: float | None,
        weights: np.ndarray | None = None,
    ):
        self.log_x = np.atleast_2d(np.asarray(log_x, dtype=float))
        self.log_loss = np.asarray(log_loss, dtype=float)
        self.k = self.log_x.shape[0]
        self.delta = delta
        self.weights = weights

    # Rows per block: (block, n) temporaries that stay in cache run several times faster
    # than one pass over all problems at once.
    block = 128

    def __call__(self, x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(x) <= self.block:
            return self._evaluate(x, rows)
        f = np.empty(len(x))
        g = np.empty_like(x)
        for i in range(0, len(x), self.block):
            sl = slice(i, i + self.block)
            f[sl], g[sl] = self._evaluate(x[sl], rows[sl])
        return f, g

    def _evaluate(self, x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = self.k
        # Plain exp/log rather than a max-shifted logsumexp: the terms are log-losses of
        # order one near any sensible iterate, and a trial step that overflows gives an
        # infinite objective, which the line search rejects.
        with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
            powers = []
            total = np.repeat(np.exp(x[:, 0])[:, None], self.log_x.shape[1], axis=1)
            for j in range(k):
                t = np.multiply.outer(-x[:, 1 + k + j], self.log_x[j])
                t += x[:, 1 + j, None]
                np.exp(t, out=t)
                total += t
                powers.append(t)
            r = np.log(total)
            r -= self.log_loss
            if self.delta is None:
                loss = 0.5 * r * r
                dloss = r
            else:
                ar = np.abs(r)
                loss = self.delta * (ar - 0.5 * self.delta)
                quad = ar <= self.delta
                loss[quad] = 0.5 * r[quad] ** 2
                dloss = np.clip(r, -self.delta, self.delta)
            if self.weights is not None:
                w = self.weights[rows]
                loss *= w
                dloss = dloss * w
            f = loss.sum(axis=1)
            # d lse / d term_j is that term's share of the total.
            dloss /= total
            g = np.empty_like(x)
            g[:, 0] = dloss.sum(axis=1) * np.exp(x[:, 0])
            for j in range(k):
                ds = dloss * powers[j]
                g[:, 1 + j] = ds.sum(axis=1)
                # einsum, not a BLAS call: a threaded gemv on these small blocks spin-waits
                # for cores that other processes hold.
                g[:, 1 + k + j] = -np.einsum("sn,n->s", ds, self.log_x[j])
        f[~np.isfinite(f)] = np.inf
        return f, g


def log_predict(x: np.ndarray, log_x: np.ndarray) -> np.ndarray:
    """log L̂ at the columns of log_x (K, n) for one optimiser vector x."""
    log_x = np.atleast_2d(log_x)
    k = log_x.shape[0]
    terms = [np.full(log_x.shape[1], x[0])]
    terms += [x[1 + j] - x[1 + k + j] * log_x[j] for j in range(k)]
    return np.logaddexp.reduce(np.vstack(terms), axis=0)


def to_natural(x: np.ndarray, k: int) -> np.ndarray:
    """[e, a.., α..] -> [E, A_1, α_1, ..., A_K, α_K] (works on one vector or rows of vectors)."""
    x = np.atleast_2d(x)
    cols = [np.exp(x[:, 0])]
    for j in range(k):
        cols += [np.exp(x[:, 1 + j]), x[:, 1 + k + j]]
    out = np.column_stack(cols)
    return out[0] if out.shape[0] == 1 else out


@dataclass
class MultiStartFit:
    """Best of many L-BFGS starts, with the diagnostics a caller reports."""

    x: np.ndarray  # optimiser vector of the best start
    fun: float
    start: np.ndarray  # where the best start began
    batch: BatchResult
    polished: int = 0  # starts refined at tight tolerance after screening

    @property
    def best(self) -> int:
        return int(np.argmin(np.where(np.isfinite(self.batch.fun), self.batch.fun, np.inf)))

    def diagnostics(self) -> dict:
        b = self.batch
        i = self.best
        return {
            "objective": float(self.fun),
            "n_starts": int(len(b.fun)),
            "starts_converged": int(b.converged.sum()),
            "best_start": [float(v) for v in self.start],
            "best_status": STATUS_TEXT[int(b.status[i])],
            "best_iterations": int(b.n_iter[i]),
            "best_grad_norm": float(b.grad_norm[i]),
            "moved_from_start": float(np.max(np.abs(self.x - self.start))),
            "starts_polished": self.polished,
        }


def solve(
    log_x: np.ndarray,
    log_loss: np.ndarray,
    delta: float | None,
    starts: np.ndarray,
    weights: np.ndarray | None = None,
    max_iter: int = 1000,
    workers: int = 1,
    gtol: float = 1e-9,
    ftol: float = 1e-10,
) -> BatchResult:
    """Batched L-BFGS from every row of starts (row i weighted by weights[i] if given).

    gtol and ftol are the optimiser's gradient and relative-decrease tolerances. workers > 1
    splits the rows over that many processes; the result is the same as with one.
    """
    starts = np.asarray(starts, dtype=float)
    if workers <= 1 or len(starts) < 2 * PowerSumObjective.block:
        return minimize_batched(PowerSumObjective(log_x, log_loss, delta, weights), starts,
                                max_iter=max_iter, gtol=gtol, ftol=ftol)
    from concurrent.futures import ProcessPoolExecutor

    chunks = np.array_split(np.arange(len(starts)), workers)
    jobs = [
        (log_x, log_loss, delta, starts[c], None if weights is None else weights[c], max_iter,
         gtol, ftol)
        for c in chunks
    ]
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(_solve_chunk, jobs))
    return BatchResult(*(np.concatenate([getattr(p, f) for p in parts])
                         for f in ("x", "fun", "grad_norm", "n_iter", "status")))


def _solve_chunk(job: tuple) -> BatchResult:
    log_x, log_loss, delta, starts, weights, max_iter, gtol, ftol = job
    return solve(log_x, log_loss, delta, starts, weights, max_iter, 1, gtol, ftol)


def fit_multistart(
    log_x: np.ndarray,
    log_loss: np.ndarray,
    starts: np.ndarray,
    delta: float | None,
    max_iter: int = 1000,
    workers: int = 1,
    screen_tol: float = 1e-6,
    polish_within: float = 1e-3,
) -> MultiStartFit:
    """Run L-BFGS from every row of starts at once and keep the lowest objective.

    Every start runs to convergence at tolerance screen_tol; the starts that end within
    polish_within (relative) of the lowest objective then continue at tight tolerances
    (gradient 1e-9, relative decrease 1e-13), which the flat A-B valley of the Chinchilla
    objective needs. Polishing only those halves the time of a 4,500-start grid, and the
    best start is the same: a start further than that from the best does not overtake it.
    """
    res = solve(log_x, log_loss, delta, starts, None, max_iter, workers, screen_tol, screen_tol)
    fun = np.where(np.isfinite(res.fun), res.fun, np.inf)
    near = np.flatnonzero(fun <= fun.min() * (1 + polish_within) + 1e-300)
    near = near[np.argsort(fun[near])][:512]
    pol = solve(log_x, log_loss, delta, res.x[near], None, max_iter, 1, 1e-9, 1e-13)
    res.x[near], res.fun[near], res.grad_norm[near] = pol.x, pol.fun, pol.grad_norm
    res.n_iter[near] += pol.n_iter
    res.status[near] = pol.status
    fun = np.where(np.isfinite(res.fun), res.fun, np.inf)
    i = int(np.argmin(fun))
    fit = MultiStartFit(x=res.x[i].copy(), fun=float(res.fun[i]), start=starts[i].copy(),
                        batch=res)
    fit.polished = int(len(near))
    return fit


def bootstrap_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) multiplicities of the points in each resample drawn with replacement."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(float)


def bootstrap_multistart(
    log_x: np.ndarray,
    log_loss: np.ndarray,
    x_best: np.ndarray,
    delta: float | None,
    resamples: int,
    seed: int,
    max_iter: int = 1000,
    workers: int = 1,
) -> BatchResult:
    """Refit every bootstrap resample, all warm-started from the full-data optimum x_best."""
    counts = bootstrap_counts(len(log_loss), resamples, seed)
    starts = np.repeat(np.asarray(x_best, dtype=float)[None, :], resamples, axis=0)
    return solve(log_x, log_loss, delta, starts, counts, max_iter, workers)


def gauss_newton_stderr(x: np.ndarray, log_x: np.ndarray, log_loss: np.ndarray) -> np.ndarray:
    """Asymptotic standard errors of [E, A_1, α_1, ...] from s²·(JᵀJ)⁻¹ of the log residuals.

    J is the Jacobian of log L̂ in the natural parameters and s² the residual variance. It
    is the least-squares approximation evaluated at the fitted point; NaN where JᵀJ is
    singular (a parameter the data do not pin down).
    """
    log_x = np.atleast_2d(log_x)
    k = log_x.shape[0]
    nat = to_natural(x, k)
    pred = np.exp(log_predict(x, log_x))
    cols = [1.0 / pred]
    for j in range(k):
        a_j, alpha_j = nat[1 + 2 * j], nat[2 + 2 * j]
        term = np.exp(-alpha_j * log_x[j])
        cols += [term / pred, -a_j * term * log_x[j] / pred]
    jac = np.column_stack(cols)
    resid = log_loss - np.log(pred)
    dof = len(resid) - jac.shape[1]
    if dof <= 0:
        return np.full(jac.shape[1], np.nan)
    s2 = float(resid @ resid) / dof
    # Work in relative units so that A ~ 1e3 and alpha ~ 0.3 do not fake ill-conditioning.
    scale = np.where(nat != 0, np.abs(nat), 1.0)
    jtj = (jac * scale).T @ (jac * scale)
    if not np.all(np.isfinite(jtj)) or np.linalg.cond(jtj) > 1e12:
        return np.full(jac.shape[1], np.nan)
    cov = s2 * np.linalg.inv(jtj)
    return np.sqrt(np.clip(np.diag(cov), 0, None)) * scale


def flag_problems(
    result: FitResult, diag: dict, loss: np.ndarray, terms: dict[str, np.ndarray]
) -> None:
    """Flag a power-sum fit that did not converge, never left its start, or degenerated.

    terms maps each power term's name to its values at the data; a term that never reaches
    1e-4 of the predicted loss leaves its coefficient and exponent undetermined.
    """
    if not result.converged:
        result.warn(f"optimiser did not converge ({diag['best_status']})")
    if diag["moved_from_start"] < 1e-8:
        result.converged = False
        result.warn("best start never moved: the fit ended at its starting point")
    degenerate = []
    p = result.params
    for name in ("alpha", "beta"):
        if name in p and not (1e-3 < p[name] < 10):
            degenerate.append(f"{name}={p[name]:.3g} is outside (0.001, 10)")
    if p["E"] < 1e-3 * float(np.min(loss)):
        degenerate.append(f"E={p['E']:.3g} collapsed to zero (no irreducible loss in the data)")
    total = p["E"] + sum(terms.values())
    for name, values in terms.items():
        share = float(np.max(values / total))
        if share < 1e-4:
            degenerate.append(f"the {name} term is at most {share:.1e} of the loss over the "
                              "data, so its coefficient and exponent are not determined")
    result.diagnostics["degenerate"] = bool(degenerate)
    for msg in degenerate:
        result.warn("degenerate fit: " + msg)
