"""fit.json and report.md for one fit."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from analysis.result import FitResult
from analysis.workflow import FitRun

FORMULA = {
    "power": "L = a·X^b",
    "saturating": "L = E + A·X^-alpha",
    "chinchilla": "L = E + A/N^alpha + B/D^beta",
    "isoflop": "N_opt = k_N·C^a, D_opt = k_D·C^b (IsoFLOP, Approach 2)",
    "allocation": "N_opt = k_N·C^a, D_opt = k_D·C^b (lower envelope, Approach 1)",
}


def fit_json(run: FitRun, source: str) -> dict:
    """The fit.json document: the result's JSON plus how the points were chosen."""
    doc = run.result.to_json()
    spec = run.spec
    doc.update(
        {
            "x": spec.x if spec.form in ("power", "saturating") else None,
            "formula": FORMULA[spec.form],
            "table": source,
            "selection": {
                "envelope": spec.envelope,
                "final_only": spec.final_only,
                "holdout_largest": spec.holdout_largest,
                "bootstrap": spec.bootstrap,
                "seed": spec.seed,
                "huber_delta": spec.huber_delta,
                "optimum": spec.optimum if spec.form == "isoflop" else None,
            },
            "table_rows": {k: v for k, v in run.table.attrs.items()},
            "notes": run.notes,
        }
    )
    return doc


def write_fit_json(run: FitRun, path: Path, source: str) -> Path:
    path.write_text(json.dumps(fit_json(run, source), indent=2, default=str) + "\n")
    return path


def write_report(run: FitRun, path: Path, source: str, figures: list[Path], command: str) -> Path:
    """A markdown page: data, fitted law, parameter table, diagnostics, extrapolation, plots."""
    r, spec = run.result, run.spec
    attrs = run.table.attrs
    lines = [f"# {spec.form} fit: `{Path(source).name}`", "", f"Command: `{command}`", ""]
    lines += ["## Data", ""]
    lines.append(
        f"- rows read: {attrs.get('rows_read', '?')}; dropped without loss: "
        f"{attrs.get('dropped_nan_loss', 0)}; dropped at zero compute/tokens: "
        f"{attrs.get('dropped_zero_compute', 0)}"
    )
    for d in attrs.get("derived", []):
        lines.append(f"- derived: {d}")
    how = []
    if spec.final_only:
        how.append("final point of each finished run")
    if spec.envelope:
        how.append("lower envelope of loss against compute")
    lines.append(f"- points fitted: {len(run.fitted)} ({', '.join(how) or 'all rows'})")
    lines += [f"- {n}" for n in run.notes]
    lines += ["", "## Fit", "", f"Form: `{FORMULA[spec.form]}`" + _x_note(spec), ""]
    lines += _param_table(r)
    lines += [
        "",
        f"- R² (log space): {_f(r.r2)}",
        f"- Pearson r ({r.pearson_r_of}): {_f(r.pearson_r)}",
        f"- points: {r.n_points}",
        f"- intervals: {r.ci_method}; standard errors: {r.stderr_method}",
        f"- converged: {'yes' if r.converged else '**no**'}",
    ]
    for k, v in r.diagnostics.items():
        lines.append(f"- {k}: {v}")
    if r.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in r.warnings]
    extra = r.extras.get("extrapolation")
    if extra:
        lines += ["", "## Extrapolation check", ""]
        lines.append(
            f"Held out the {spec.holdout_largest} largest; mean |relative error| "
            f"{100 * extra['mean_abs_rel_error']:.2f}%, max {100 * extra['max_abs_rel_error']:.2f}%."
        )
        lines += ["", _markdown_table(pd.DataFrame(extra["points"]))]
    if "optima" in r.extras:
        lines += ["", "## Optimum per compute budget", ""]
        lines.append(_markdown_table(pd.DataFrame(r.extras["optima"])))
    lines += ["", "## Figures", ""]
    lines += [f"![{p.stem}]({p.name})" for p in figures if p.suffix == ".png"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _x_note(spec) -> str:
    return f", X = {spec.x}" if spec.form in ("power", "saturating") else ""


def _param_table(r: FitResult) -> list[str]:
    lo_name = f"{r.ci_level:.0%} CI"
    out = [f"| parameter | value | std. error | {lo_name} |", "|---|---|---|---|"]
    for k, v in r.params.items():
        lo, hi = r.ci.get(k, [float("nan"), float("nan")])
        out.append(f"| {k} | {_f(v)} | {_f(r.stderr.get(k, float('nan')))} | "
                   f"[{_f(lo)}, {_f(hi)}] |")
    return out


def _f(v: float) -> str:
    return "n/a" if v is None or v != v else f"{v:.5g}"


def _markdown_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        cells = [_f(v) if isinstance(v, float) else str(v) for v in row.tolist()]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
