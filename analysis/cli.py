"""polar-analyze: scaling-law fits and envelopes from a result table (CSV or Parquet).

    polar-analyze fit TABLE --form power|saturating|chinchilla|isoflop|allocation
                      [--x compute|params|tokens] --out DIR
    polar-analyze envelope TABLE --out DIR
    polar-analyze rft TABLE --out DIR     # RFT: the true KL's fall per reward model
"""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from pathlib import Path

from analysis.envelope import final_points, lower_envelope
from analysis.load import AXES, Columns, check_named_columns, read_table, standardize
from analysis.result import FitError, FitWarning
from analysis.workflow import FORMS, X_AXES, FitSpec, run_fit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polar-analyze",
        description="Scaling-law fits, compute envelopes and plots from a result table.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="fit a scaling law; write fit.json, report.md and plots")
    fit.add_argument("table", type=Path, help="CSV or Parquet result table")
    fit.add_argument("--form", required=True, choices=FORMS,
                     help="power: L=a·X^b; saturating: L=E+A·X^-alpha; chinchilla: "
                          "L=E+A/N^alpha+B/D^beta; isoflop: Approach 2 exponents; "
                          "allocation: Approach 1 exponents from the envelope")
    fit.add_argument("--x", default="compute", choices=X_AXES,
                     help="X of the power and saturating laws (default: compute)")
    fit.add_argument("--out", required=True, type=Path, help="output directory")
    _column_flags(fit)
    fit.add_argument("--envelope", action=argparse.BooleanOptionalAction, default=None,
                     help="fit the lower envelope of loss against compute over all learning "
                          "curves (default for --x compute)")
    fit.add_argument("--final-only", dest="final_only", action="store_true", default=None,
                     help="use only each finished run's final point (default for --x params, "
                          "--x tokens, chinchilla and isoflop)")
    fit.add_argument("--all-points", dest="final_only", action="store_false",
                     help="use every evaluation, not only final points")
    fit.add_argument("--holdout-largest", type=int, default=0, metavar="K",
                     help="extrapolation check: fit without the K largest model sizes (IsoFLOP: "
                          "compute budgets) and report the relative error of their prediction")
    fit.add_argument("--bootstrap", type=int, default=200, metavar="N",
                     help="bootstrap resamples for the confidence intervals (default 200; "
                          "0 for analytic intervals)")
    fit.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    fit.add_argument("--ci", type=float, default=0.95, help="interval level (default 0.95)")
    fit.add_argument("--huber-delta", type=float, default=None,
                     help="Huber threshold on log residuals (chinchilla default 1e-3; "
                          "saturating default: least squares)")
    fit.add_argument("--optimum", choices=("parabola", "akima"), default="parabola",
                     help="IsoFLOP minimum per budget: parabola in log N (Chinchilla) or "
                          "Akima interpolation (Porian et al.)")
    fit.add_argument("--budget-rtol", type=float, default=0.05,
                     help="IsoFLOP: compute values within this relative gap form one budget")
    fit.add_argument("--workers", type=int, default=1,
                     help="chinchilla: processes for the start grid and the bootstrap")
    fit.add_argument("--no-plots", action="store_true", help="skip the figures")

    env = sub.add_parser("envelope", help="lower envelope of loss against compute")
    env.add_argument("table", type=Path, help="CSV or Parquet result table")
    env.add_argument("--out", required=True, type=Path, help="output directory")
    _column_flags(env)
    env.add_argument("--final-only", action="store_true",
                     help="envelope of the finished runs' final points only")
    env.add_argument("--no-plots", action="store_true", help="skip the figure")

    rft = sub.add_parser("rft", help="RFT sweep: fall of the true KL to the target per reward "
                                     "model and control; write rft.json, rft.md and plots")
    rft.add_argument("table", type=Path, help="an rft sweep's results.csv or .parquet")
    rft.add_argument("--out", required=True, type=Path, help="output directory")
    rft.add_argument("--where", metavar="EXPR", help="keep only rows matching this pandas query")
    rft.add_argument("--no-plots", action="store_true", help="skip the figures")
    return parser


def _column_flags(p: argparse.ArgumentParser) -> None:
    d = Columns()
    g = p.add_argument_group("column names")
    g.add_argument("--params", default=d.params, help=f"parameter count (default {d.params})")
    g.add_argument("--tokens", default=d.tokens, help=f"training tokens (default {d.tokens})")
    g.add_argument("--compute", default=d.compute, help=f"training FLOPs (default {d.compute})")
    g.add_argument("--loss", default=d.loss, help=f"loss to fit (default {d.loss})")
    g.add_argument("--group", default=d.group, help=f"run identifier (default {d.group})")
    p.add_argument("--where", metavar="EXPR",
                   help="keep only rows matching this pandas query, e.g. \"config_id == 4\"")


def _columns(args: argparse.Namespace) -> Columns:
    return Columns(params=args.params, tokens=args.tokens, compute=args.compute,
                   loss=args.loss, group=args.group)


def _read(args: argparse.Namespace, columns: bool = True):
    raw = read_table(args.table)
    if columns:
        default = Columns()
        named = tuple(a for a in AXES if getattr(args, a) != getattr(default, a))
        check_named_columns(raw, _columns(args), named)
    if not args.where:
        return raw
    try:
        raw = raw.query(args.where)
    except Exception as exc:  # pandas raises many types for a bad expression
        raise FitError(f"--where {args.where!r} failed: {exc}") from exc
    if raw.empty:
        raise FitError(f"--where {args.where!r} matches no row")
    return raw


def cmd_fit(args: argparse.Namespace, command: str) -> int:
    from analysis.plots import plot_fit
    from analysis.report import write_fit_json, write_report

    spec = FitSpec(
        form=args.form, x=args.x, envelope=args.envelope, final_only=args.final_only,
        holdout_largest=args.holdout_largest, bootstrap=args.bootstrap, seed=args.seed,
        ci_level=args.ci, huber_delta=args.huber_delta, optimum=args.optimum,
        budget_rtol=args.budget_rtol, workers=args.workers,
    ).resolved()
    if args.bootstrap < 0 or args.holdout_largest < 0:
        raise FitError("--bootstrap and --holdout-largest must be >= 0")
    if not 0 < args.ci < 1:
        raise FitError("--ci must be between 0 and 1")
    table = standardize(_read(args), _columns(args), need=spec.needed_axes())
    run = run_fit(table, spec)
    args.out.mkdir(parents=True, exist_ok=True)
    figures = [] if args.no_plots else plot_fit(run, args.out)
    write_fit_json(run, args.out / "fit.json", str(args.table))
    write_report(run, args.out / "report.md", str(args.table), figures, command)
    print(_summary(run))
    print(f"wrote {args.out / 'fit.json'}, {args.out / 'report.md'}"
          + (f" and {len(figures)} figure files" if figures else ""))
    return 0


def cmd_envelope(args: argparse.Namespace) -> int:
    from analysis.plots import plot_envelope

    table = standardize(_read(args), _columns(args), need=("compute",))
    rows = final_points(table) if args.final_only else table
    env = lower_envelope(rows, "compute")
    args.out.mkdir(parents=True, exist_ok=True)
    env.to_csv(args.out / "envelope.csv", index=False)
    files = [] if args.no_plots else plot_envelope(table, env, args.out / "envelope")
    runs = env["group"].nunique()
    print(f"envelope: {len(env)} of {len(rows)} points, from {runs} run(s), compute "
          f"{env['compute'].min():.3g}–{env['compute'].max():.3g} FLOPs, loss "
          f"{env['loss'].max():.4g}→{env['loss'].min():.4g}")
    print(f"wrote {args.out / 'envelope.csv'}" + (f" and {len(files)} figure files" if files else ""))
    return 0


def cmd_rft(args: argparse.Namespace) -> int:
    from analysis.rft import rft_rows, summarize, write_outputs

    rows = rft_rows(_read(args, columns=False))
    summary = summarize(rows)
    figures = []
    if not args.no_plots:
        from analysis.rft_plots import plot_rft

        args.out.mkdir(parents=True, exist_ok=True)
        figures = plot_rft(summary, args.out)
    write_outputs(summary, args.out, str(args.table), figures)
    for a in summary["arms"]:
        sd = f" ± {100 * a['fall_sd']:.1f}" if a["fall_sd"] is not None else ""
        print(f"{a['arm']:<32} {a['runs']} run(s)  fall {100 * a['fall_mean']:5.1f}%{sd}")
    ordering = summary["ordering"]
    for key, value in ordering.items():
        if key.startswith("spearman") and not key.endswith("_p"):
            print(f"{key}: {value:+.2f} (permutation p = {ordering[key + '_p']:.2g})")
    print(f"wrote {args.out / 'rft.json'}, {args.out / 'rft.md'}"
          + (f" and {len(figures)} figure files" if figures else ""))
    return 0


def _summary(run) -> str:
    r = run.result
    params = ", ".join(f"{k}={v:.4g}" for k, v in r.params.items())
    ci = "; ".join(f"{k} [{lo:.4g}, {hi:.4g}]" for k, (lo, hi) in r.ci.items())
    text = (f"{r.form} fit on {r.n_points} points: {params}\n"
            f"  R²={r.r2:.4f}  r={r.pearson_r:.4f}  {r.ci_level:.0%} CI: {ci}")
    if not r.converged:
        text += "\n  NOT CONVERGED"
    extra = r.extras.get("extrapolation")
    if extra:
        text += f"\n  extrapolation: mean |rel. error| {100 * extra['mean_abs_rel_error']:.2f}%"
    return text


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    prefix = "warning" if issubclass(category, FitWarning) else category.__name__
    print(f"polar-analyze: {prefix}: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 for input no fit can use)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    command = "polar-analyze " + shlex.join(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always", FitWarning)
        warnings.showwarning = _show_warning
        try:
            if args.command == "fit":
                return cmd_fit(args, command)
            if args.command == "rft":
                return cmd_rft(args)
            return cmd_envelope(args)
        except FitError as exc:
            print(f"polar-analyze: error: {exc}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
