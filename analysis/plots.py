"""Figures for fits and envelopes, saved as PNG and PDF. Matplotlib with the Agg backend."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import (  # noqa: E402
    FuncFormatter,
    Locator,
    LogLocator,
    MaxNLocator,
    NullFormatter,
)
from scipy.interpolate import Akima1DInterpolator  # noqa: E402

from analysis.chinchilla import chinchilla_loss  # noqa: E402
from analysis.isoflop import budget_arrays, curve_points  # noqa: E402
from analysis.result import FitResult  # noqa: E402
from analysis.workflow import FitRun  # noqa: E402

AXIS_LABEL = {
    "compute": "training compute C (FLOPs)",
    "params": "parameters N",
    "tokens": "training tokens D",
}
SYMBOL = {"compute": "C", "params": "N", "tokens": "D"}
LOSS_LABEL = "loss (nats)"
HELD = "#d62728"
FIT = "#1f77b4"


def save(fig: plt.Figure, stem: Path) -> list[Path]:
    """Write stem.png (150 dpi) and stem.pdf; close the figure; return both paths."""
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    # Lay the figure out once, then freeze it: each save would otherwise redo the layout,
    # which measures every tick label and dominates the time to write a figure.
    fig.canvas.draw()
    fig.set_layout_engine("none")
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def plot_fit(run: FitRun, out_dir: Path) -> list[Path]:
    """The figure(s) for one fit, named after its form; returns the files written."""
    out_dir = Path(out_dir)
    form = run.spec.form
    if form in ("power", "saturating"):
        return save(_one_variable(run), out_dir / f"{form}_{run.spec.x}")
    if form == "chinchilla":
        return save(_chinchilla(run), out_dir / "chinchilla")
    if form == "isoflop":
        return save(_isoflop(run), out_dir / "isoflop")
    return save(_allocation(run), out_dir / "allocation")


def plot_envelope(table: pd.DataFrame, env: pd.DataFrame, stem: Path) -> list[Path]:
    """Every run's learning curve (loss vs compute), coloured by size, and the envelope."""
    fig, ax = plt.subplots(figsize=(7.5, 5), layout="constrained")
    _curves(ax, table)
    ax.plot(env["compute"], env["loss"], "-o", color="black", ms=3, lw=1.5,
            label=f"lower envelope ({len(env)} points)")
    _loglog(ax, "compute")
    ax.set_title("Learning curves and their lower envelope")
    ax.legend(loc="upper right", fontsize=9)
    return save(fig, Path(stem))


def _one_variable(run: FitRun) -> plt.Figure:
    r, x = run.result, run.spec.x
    fig, (ax, axr) = plt.subplots(2, 1, figsize=(7.5, 6.5), sharex=True, layout="constrained",
                                  gridspec_kw={"height_ratios": [3, 1]})
    fitted = run.fitted
    if run.spec.envelope:
        _curves(ax, run.table, colorbar=False, alpha=0.35)
        what = "lower-envelope points"
    else:
        others = run.table.drop(index=run.table.index[run.table["final"]]) if run.spec.final_only \
            else run.table.iloc[0:0]
        if not others.empty:
            ax.scatter(others[x], others["loss"], s=6, color="0.75", label="non-final points")
        what = "final points" if run.spec.final_only else "points"
    ax.scatter(fitted[x], fitted["loss"], s=18, color=FIT, zorder=3,
               label=f"{what} used in the fit ({len(fitted)})")
    lo_x, hi_x = fitted[x].min(), fitted[x].max()
    if run.heldout is not None:
        hi_x = max(hi_x, run.heldout[x].max())
    grid = np.geomspace(lo_x, hi_x, 200)
    band = r.predict_band(grid)
    if band:
        ax.fill_between(grid, *band, color=FIT, alpha=0.2, lw=0,
                        label=f"{r.ci_level:.0%} bootstrap band")
    ax.plot(grid, r.predict(grid), color=FIT, lw=2, label=_formula(r, SYMBOL[x]))
    if run.heldout is not None:
        _heldout(ax, run.heldout, x)
    _loglog(ax, x, xlabel=False)
    kind = "power law" if r.form == "power" else "saturating power law"
    ax.set_title(f"{kind.capitalize()}: loss vs {AXIS_LABEL[x].split(' (')[0]}")
    ax.legend(fontsize=8.5, loc="upper right")
    axr.axhline(0, color="0.4", lw=1)
    axr.scatter(fitted[x], r.residuals, s=12, color=FIT)
    axr.set_xscale("log")
    axr.set_xlabel(AXIS_LABEL[x])
    axr.set_ylabel("log residual\nln(L / L̂)")
    axr.grid(alpha=0.3)
    return fig


def _chinchilla(run: FitRun) -> plt.Figure:
    r, fitted = run.result, run.fitted
    fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(17, 5.2), layout="constrained")
    norm = LogNorm(run.table["params"].min(), run.table["params"].max())
    pred = r.predict(fitted["params"].to_numpy(), fitted["tokens"].to_numpy())
    sc = ax0.scatter(pred, fitted["loss"], c=fitted["params"], norm=norm, cmap="viridis", s=14)
    lims = [min(pred.min(), fitted["loss"].min()), max(pred.max(), fitted["loss"].max())]
    ax0.plot(lims, lims, color="0.3", lw=1, label="observed = predicted")
    ax0.set_xscale("log")
    ax0.set_yscale("log")
    _loss_ticks(ax0, both=True)
    ax0.set_xlabel("predicted loss L̂ (nats)")
    ax0.set_ylabel("observed " + LOSS_LABEL)
    ax0.set_title(f"Observed vs fitted (R² of log loss {r.r2:.4f})")
    ax0.legend(fontsize=9, loc="upper left")
    ax0.grid(alpha=0.3)

    ax1.scatter(fitted["compute"], fitted["loss"], c=fitted["params"], norm=norm,
                cmap="viridis", s=14, label=f"points used in the fit ({len(fitted)})")
    c_hi = fitted["compute"].max()
    if run.heldout is not None:
        c_hi = max(c_hi, run.heldout["compute"].max())
    cgrid = np.geomspace(fitted["compute"].min(), c_hi, 120)
    frontier = _frontier(r.params, cgrid)
    if r.bootstrap_samples is not None and len(r.bootstrap_samples) > 1:
        names = list(r.params)
        curves = np.array([_frontier(dict(zip(names, s, strict=True)), cgrid)
                           for s in r.bootstrap_samples])
        tail = 50 * (1 - r.ci_level)
        lo, hi = np.nanpercentile(curves, [tail, 100 - tail], axis=0)
        ax1.fill_between(cgrid, lo, hi, color=FIT, alpha=0.2, lw=0,
                         label=f"{r.ci_level:.0%} bootstrap band")
    ax1.plot(cgrid, frontier, color=FIT, lw=2,
             label="compute-optimal loss of the fit\n" + _formula(r, "N"))
    if run.heldout is not None:
        _heldout(ax1, run.heldout, "compute")
    _loglog(ax1, "compute")
    ax1.set_title("Loss vs compute (C = 6ND), fitted frontier")
    ax1.legend(fontsize=8, loc="lower left")

    ax2.axhline(0, color="0.4", lw=1)
    ax2.scatter(fitted["compute"], r.residuals, c=fitted["params"], norm=norm, cmap="viridis",
                s=14)
    ax2.set_xscale("log")
    ax2.set_xlabel(AXIS_LABEL["compute"])
    ax2.set_ylabel("log residual ln(L / L̂)")
    ax2.set_title("Residuals")
    ax2.grid(alpha=0.3)
    fig.colorbar(sc, ax=[ax0, ax1, ax2], label="parameters N", pad=0.01, aspect=40)
    return fig


def _isoflop(run: FitRun) -> plt.Figure:
    r = run.result
    optima = pd.DataFrame(r.extras["optima"])
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(14, 5.5), layout="constrained")
    budgets = budget_arrays(run.fitted, run.spec.budget_rtol)
    norm = LogNorm(min(b[0] for b in budgets), max(b[0] for b in budgets))
    cmap = plt.get_cmap("plasma")
    for (c, n, _, loss), (_, opt) in zip(budgets, optima.iterrows(), strict=True):
        color = cmap(norm(c) * 0.85)
        ln, ll = curve_points(n, loss)
        ax0.plot(np.exp(ln), ll, "o", color=color, ms=4, alpha=1.0 if opt["used"] else 0.35)
        if len(ln) >= 3 and opt["used"]:
            g = np.linspace(ln[0], ln[-1], 100)
            ax0.plot(np.exp(g), _curve(ln, ll, g, run.spec.optimum), color=color, lw=1.3)
            ax0.plot(opt["n_opt"], opt["loss_opt"], "*", color="black", ms=9, zorder=4)
    ax0.plot([], [], "*", color="black", ms=9, label="optimum per budget")
    ax0.plot([], [], "o", color="0.6", alpha=0.35, label="budget skipped (edge minimum)")
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax0, label="compute budget C (FLOPs)", pad=0.01)
    _loglog(ax0, "params")
    method = "parabola in log N" if run.spec.optimum == "parabola" else "Akima interpolation"
    ax0.set_title(f"IsoFLOP curves ({method})")
    ax0.legend(fontsize=9, loc="upper right")

    used = optima[optima["used"]]
    c = used["compute"].to_numpy()
    ax1.plot(c, used["n_opt"], "o", color=FIT, label="N_opt per budget (parameters)")
    ax1.plot(c, used["d_opt"], "s", color="#2ca02c", label="D_opt per budget (tokens)")
    c_hi = c.max() if run.heldout is None else max(c.max(), run.heldout["compute"].max())
    grid = np.geomspace(c.min(), c_hi, 100)
    p = r.params
    _band(ax1, r, grid, lambda s, g: s[2] * g ** s[0], FIT)
    _band(ax1, r, grid, lambda s, g: s[3] * g ** s[1], "#2ca02c")
    ax1.plot(grid, p["k_N"] * grid ** p["a"], color=FIT, lw=2,
             label=_allocation_label(r, "N"))
    ax1.plot(grid, p["k_D"] * grid ** p["b"], color="#2ca02c", lw=2,
             label=_allocation_label(r, "D"))
    if run.heldout is not None:
        h = run.heldout
        ax1.plot(h["compute"], h["observed"], "*", color=HELD, ms=13, label="held-out N_opt")
        for _, row in h.iterrows():
            ax1.annotate(f"{100 * (row['predicted'] / row['observed'] - 1):+.1f}%",
                         (row["compute"], row["observed"]), textcoords="offset points",
                         xytext=(6, -12), color=HELD, fontsize=9)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel(AXIS_LABEL["compute"])
    ax1.set_ylabel("compute-optimal N (parameters) and D (tokens)")
    ax1.set_title(f"Compute-optimal allocation (R² of log N_opt {r.r2:.3f})")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8.5, loc="lower right")
    return fig


def _allocation(run: FitRun) -> plt.Figure:
    r, env = run.result, run.fitted
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(14, 5.5), layout="constrained")
    _curves(ax0, run.table)
    ax0.plot(env["compute"], env["loss"], "-o", color="black", ms=3, lw=1.5,
             label=f"lower envelope ({len(env)} points)")
    _loglog(ax0, "compute")
    ax0.legend(fontsize=9, loc="upper right")
    ax0.set_title("Learning curves and envelope")
    c = env["compute"].to_numpy()
    inner = env["params"].isin(r.extras.get("fitted_sizes", env["params"].unique()))
    ax1.plot(c[inner], env["params"][inner], "o", color=FIT, ms=4,
             label="N on the envelope (parameters)")
    ax1.plot(c[inner], env["tokens"][inner], "s", color="#2ca02c", ms=4,
             label="D on the envelope (tokens)")
    if not inner.all():
        ax1.plot(c[~inner], env["params"][~inner], "o", mfc="none", color=FIT, ms=4,
                 label="smallest/largest size (not fitted)")
        ax1.plot(c[~inner], env["tokens"][~inner], "s", mfc="none", color="#2ca02c", ms=4)
    grid = np.geomspace(c.min(), c.max(), 100)
    p = r.params
    _band(ax1, r, grid, lambda s, g: s[2] * g ** s[0], FIT)
    _band(ax1, r, grid, lambda s, g: s[3] * g ** s[1], "#2ca02c")
    ax1.plot(grid, p["k_N"] * grid ** p["a"], color=FIT, lw=2,
             label=_allocation_label(r, "N"))
    ax1.plot(grid, p["k_D"] * grid ** p["b"], color="#2ca02c", lw=2,
             label=_allocation_label(r, "D"))
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel(AXIS_LABEL["compute"])
    ax1.set_ylabel("N (parameters) and D (tokens)")
    ax1.set_title("Approach 1: allocation along the envelope")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8.5, loc="lower right")
    return fig


def _curves(ax, table: pd.DataFrame, colorbar: bool = True, alpha: float = 0.8) -> None:
    """One thin line per run (loss vs compute), coloured by its parameter count."""
    norm = LogNorm(table["params"].min(), table["params"].max() * 1.0001)
    cmap = plt.get_cmap("viridis")
    for _, g in table.sort_values("compute").groupby("group"):
        color = cmap(norm(g["params"].iloc[0]))
        if len(g) > 1:
            ax.plot(g["compute"], g["loss"], color=color, lw=0.9, alpha=alpha)
        else:
            ax.plot(g["compute"], g["loss"], ".", color=color, alpha=alpha)
    if colorbar:
        sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
        ax.figure.colorbar(sm, ax=ax, label="parameters N", pad=0.01)
    else:
        ax.plot([], [], color=cmap(0.5), lw=0.9, alpha=alpha,
                label=f"learning curves ({table['group'].nunique()} runs)")


def _heldout(ax, held: pd.DataFrame, x: str) -> None:
    ax.plot(held[x], held["observed"], "*", color=HELD, ms=13, zorder=5,
            label="held out: observed")
    ax.plot(held[x], held["predicted"], "D", mfc="none", mec=HELD, ms=8, zorder=5,
            label="held out: predicted")
    if "predicted_lo" in held:
        ax.vlines(held[x], held["predicted_lo"], held["predicted_hi"], color=HELD, lw=1.5)
    for _, row in held.iterrows():
        err = 100 * (row["predicted"] / row["observed"] - 1)
        ax.annotate(f"error {err:+.2f}%", (row[x], row["observed"]), textcoords="offset points",
                    xytext=(-12, 0), ha="right", va="center", color=HELD, fontsize=9)


def _formula(r: FitResult, sym: str) -> str:
    p = r.params
    if r.form == "power":
        return (rf"fit: $L = {p['a']:.4g}\,{sym}^{{{p['b']:.4f}}}$"
                f"\nR² = {r.r2:.4f}, Pearson r = {r.pearson_r:.4f}")
    if r.form == "saturating":
        return (rf"fit: $L = {p['E']:.4g} + {p['A']:.4g}\,{sym}^{{-{p['alpha']:.4f}}}$"
                f"\nR² = {r.r2:.4f}")
    return (rf"$L = {p['E']:.3f} + {p['A']:.4g}/N^{{{p['alpha']:.3f}}}"
            rf" + {p['B']:.4g}/D^{{{p['beta']:.3f}}}$"
            f"\nR² = {r.r2:.4f}")


def _allocation_label(r: FitResult, which: str) -> str:
    p = r.params
    coef, exp, name = ("k_N", "a", "N") if which == "N" else ("k_D", "b", "D")
    return (rf"$\mathrm{{{name}}}_{{opt}} = {p[coef]:.3g}\,C^{{{p[exp]:.3f}}}$"
            f"  ({_ci(r, exp)})")


def _ci(r: FitResult, name: str) -> str:
    lo, hi = r.ci[name]
    return f"{r.ci_level:.0%} CI {lo:.3f}–{hi:.3f}"


def _band(ax, r: FitResult, grid: np.ndarray, f, color: str) -> None:
    if r.bootstrap_samples is None or len(r.bootstrap_samples) < 2:
        return
    curves = np.array([f(s, grid) for s in r.bootstrap_samples])
    tail = 50 * (1 - r.ci_level)
    lo, hi = np.nanpercentile(curves, [tail, 100 - tail], axis=0)
    ax.fill_between(grid, lo, hi, color=color, alpha=0.2, lw=0)


def _frontier(params: dict[str, float], c: np.ndarray) -> np.ndarray:
    """Lowest loss the fitted law reaches at each compute over N (D = C/6N)."""
    # Search N over eight decades around sqrt(C/6), where any sensible optimum lies.
    n = np.sqrt(c[:, None] / 6.0) * np.geomspace(1e-4, 1e4, 400)[None, :]
    loss = chinchilla_loss(params, n, c[:, None] / (6.0 * n))
    return loss.min(axis=1)


def _curve(ln: np.ndarray, ll: np.ndarray, grid: np.ndarray, method: str) -> np.ndarray:
    if method == "parabola":
        return np.polyval(np.polyfit(ln, ll, 2), grid)
    return np.exp(Akima1DInterpolator(ln, np.log(ll))(grid))


def _loglog(ax, x: str, xlabel: bool = True) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    _loss_ticks(ax)
    if xlabel:
        ax.set_xlabel(AXIS_LABEL[x])
    ax.set_ylabel(LOSS_LABEL)
    ax.grid(alpha=0.3, which="major")


def _loss_ticks(ax, both: bool = False) -> None:
    """Plain-number ticks on a log loss axis, whose range is usually under one decade."""
    for axis in [ax.yaxis, ax.xaxis] if both else [ax.yaxis]:
        axis.set_major_locator(_LossLocator())
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        axis.set_minor_formatter(NullFormatter())


class _LossLocator(Locator):
    """Round ticks spread evenly in log space when the axis spans under ~1.3 decades.

    A loss axis often spans 0.5 to 0.7 nats, where a log locator places no tick at all, and
    linear ticks crowd the top of a log axis; wider axes get the usual decade ticks.
    """

    MANTISSAS = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2, 2.5, 2.8, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0,
                 8.0, 9.0)

    def __call__(self):
        lo, hi = self.axis.get_view_interval()
        return self.tick_values(lo, hi)

    def tick_values(self, vmin, vmax):
        if not (vmin > 0 and vmax / vmin < 20):
            return LogLocator(base=10).tick_values(vmin, vmax)
        decades = range(int(np.floor(np.log10(vmin))), int(np.ceil(np.log10(vmax))) + 1)
        cands = [m * 10.0**k for k in decades for m in self.MANTISSAS if vmin <= m * 10.0**k <= vmax]
        gap = np.log(vmax / vmin) / 8
        ticks = []
        for c in cands:
            if not ticks or np.log(c / ticks[-1]) >= gap:
                ticks.append(c)
        if len(ticks) < 4:
            return MaxNLocator(nbins=6).tick_values(vmin, vmax)
        return np.array(ticks)
