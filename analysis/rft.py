"""RFT scaling from a results table: how far each reward pulls the policy toward the target.

``polar-analyze rft TABLE --out DIR`` reads the rows of ``rft`` runs (``polar-sweep collect``
writes them: one per true-KL evaluation) and groups the finished runs into *arms*: runs that
differ only in their seed (their sweep name without the ``-sN`` seed part, e.g.
``rm-t25k-tok2e6-rs0``, ``untrained-t25k``, ``random``; in a table without names, the
reward mode and model). Per arm, over seeds: the fall of the true KL to the target
(``true_kl_fall``, 1 − final / initial) as mean, sample sd, min and max; the true KL at the
start and the end; the mean curve. Across the trained RMs: Spearman's rank correlation of the
mean fall with the RM's parameters and with its nominal pre-training tokens (does a larger or
longer-trained RM pull harder?), with the exact permutation p-value for up to 8 RMs, and each
RM arm's margin over the strongest control. Writes ``rft.json``, ``rft.md`` and the figures.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import permutation_test, rankdata, spearmanr

from analysis.load import _as_bool
from analysis.result import FitError

REQUIRED = ("run_id", "step", "true_kl", "true_kl_fall", "final", "reward_mode")
CONTROLS = ("untrained_rm", "random")


def rft_rows(raw: pd.DataFrame) -> pd.DataFrame:
    """The evaluation rows of rft runs, columns checked and typed; FitError if there are none."""
    missing = [c for c in REQUIRED if c not in raw.columns]
    if missing:
        raise FitError(f"column {missing[0]!r} not in table: not an rft results table "
                       f"(`polar-sweep collect` of a sweep with stage rft writes one); "
                       f"columns are {list(raw.columns)}")
    rows = raw[pd.to_numeric(raw["true_kl"], errors="coerce").notna()].copy()
    if rows.empty:
        raise FitError("no row has a true_kl value: no rft run with a target policy has "
                       "evaluated yet")
    for col in ("step", "true_kl", "true_kl_fall", "true_kl_per_token", "rm_params",
                "rm_tokens", "rm_budget_tokens", "seed"):
        if col in rows.columns:
            rows[col] = pd.to_numeric(rows[col], errors="coerce").astype(float)
    rows["final"] = rows["final"].map(_as_bool).fillna(False).astype(bool)
    for col in ("reward_model", "rm_size", "name", "seed"):
        if col not in rows.columns:
            rows[col] = None
    rows["arm"] = [arm_of(r) for r in rows.itertuples(index=False)]
    return rows


def arm_of(row) -> str:
    """The arm of a run: its sweep name without the stage and the RFT seed (``-sN``; an RM's
    own seed is ``-rsN``); without a name, the reward mode and the RM folder's run."""
    if isinstance(row.name, str) and row.name:
        return re.sub(r"-s\d+(?=-|$)", "", row.name.removeprefix("rft-"))
    if row.reward_model is None or row.reward_model != row.reward_model:
        return str(row.reward_mode)
    return f"{row.reward_mode} {Path(str(row.reward_model)).parent.name or row.reward_model}"


def summarize(rows: pd.DataFrame) -> dict:
    """Per-arm statistics of the finished runs, their curves, and the ordering of the RMs."""
    final = rows[rows["final"]]
    if final.empty:
        raise FitError(f"none of the {rows['run_id'].nunique()} rft run(s) in the table has "
                       "finished (no row with final true)")
    no_start = final[~np.isfinite(final["true_kl_fall"].to_numpy(float))]
    final = final.drop(no_start.index)  # a fall needs the step-0 evaluation
    if final.empty:
        raise FitError("no finished rft run has a true_kl_fall (each lacks its step-0 "
                       "evaluation)")
    arms = []
    for arm, g in final.groupby("arm", sort=False):
        runs = g["run_id"].tolist()
        start = rows[rows["run_id"].isin(runs) & (rows["step"] == 0)]
        fall = g["true_kl_fall"].to_numpy(float)
        arms.append({
            "arm": arm, "reward_mode": g["reward_mode"].iloc[0],
            "reward_model": _none(g["reward_model"].iloc[0]),
            "rm_size": _none(g["rm_size"].iloc[0]),
            "rm_params": _num(g, "rm_params"), "rm_tokens": _num(g, "rm_tokens"),
            "rm_budget_tokens": _num(g, "rm_budget_tokens"),
            "runs": len(g), "seeds": sorted(int(s) for s in g["seed"].dropna()),
            "steps": float(g["step"].median()),
            "fall_mean": float(fall.mean()),
            "fall_sd": float(fall.std(ddof=1)) if len(fall) > 1 else None,
            "fall_min": float(fall.min()), "fall_max": float(fall.max()),
            "true_kl_start": float(start["true_kl"].mean()) if len(start) else None,
            "true_kl_end": float(g["true_kl"].mean()),
            "curve": _curve(rows[rows["run_id"].isin(runs)]),
        })
    trained = [a for a in arms if a["reward_mode"] == "rm"]
    controls = [a for a in arms if a["reward_mode"] in CONTROLS]
    best_control = max((a["fall_mean"] for a in controls), default=None)
    for a in trained:
        a["margin_over_controls"] = (a["fall_mean"] - best_control
                                     if best_control is not None else None)
    unfinished = sorted(set(rows["run_id"]) - set(final["run_id"]) - set(no_start["run_id"]))
    return {"arms": arms, "ordering": _ordering(trained), "best_control_fall": best_control,
            "unfinished_runs": unfinished, "runs_without_start": sorted(no_start["run_id"])}


def write_outputs(summary: dict, out: Path, source: str, figures: list[Path]) -> list[Path]:
    """rft.json (the summary) and rft.md (a table and the ordering) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    doc = _finite({"table": source, **summary})
    (out / "rft.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    lines = [f"# RFT: fall of the true KL to the target, per reward ({source})", "",
             "| reward | RM params | RM tokens | runs | fall mean ± sd [min, max] | true KL "
             "start → end |", "|---|---|---|---|---|---|"]
    for a in summary["arms"]:
        sd = f" ± {100 * a['fall_sd']:.1f}" if a["fall_sd"] is not None else ""
        start = f"{a['true_kl_start']:.3g}" if a["true_kl_start"] is not None else "?"
        tokens = a["rm_budget_tokens"] if a["rm_budget_tokens"] is not None else a["rm_tokens"]
        lines.append(f"| {a['arm']} | {_g(a['rm_params'])} | {_g(tokens)} | "
                     f"{a['runs']} | {100 * a['fall_mean']:.1f}%{sd} "
                     f"[{100 * a['fall_min']:.1f}, {100 * a['fall_max']:.1f}] | "
                     f"{start} → {a['true_kl_end']:.3g} |")
    lines += ["", _ordering_text(summary)]
    if summary["unfinished_runs"]:
        lines += ["", f"Not finished (left out): {', '.join(summary['unfinished_runs'])}."]
    if summary["runs_without_start"]:
        lines += ["", "Without a step-0 evaluation (left out): "
                      f"{', '.join(summary['runs_without_start'])}."]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in figures if p.suffix == ".png"]
    (out / "rft.md").write_text("\n".join(lines) + "\n")
    return [out / "rft.json", out / "rft.md"]


def _ordering(trained: list[dict]) -> dict:
    """Spearman's ρ of the arms' mean falls with the RM's parameters and with its nominal
    tokens (actual tokens when the budget is unknown), and its two-sided permutation p-value:
    exact for up to 8 RMs, else from 9,999 permutations."""
    out = {"rm_arms": len(trained)}
    for name, keys in (("params", ("rm_params",)), ("tokens", ("rm_budget_tokens", "rm_tokens"))):
        key = next((k for k in keys if all(a.get(k) is not None for a in trained)), None)
        if key is None:
            continue
        x = np.array([a[key] for a in trained])
        y = np.array([a["fall_mean"] for a in trained])
        if len(np.unique(x)) < 2:
            continue
        rho = float(spearmanr(x, y).statistic)
        if not math.isfinite(rho):  # every mean fall equal
            continue
        # Spearman's rho is Pearson's r of the ranks: rank once, correlate every permutation
        # of the x ranks with the y ranks at once.
        rx, ry = (rankdata(v) - (len(v) + 1) / 2 for v in (x, y))
        ry = ry / np.linalg.norm(ry)

        def rho_of(v, axis=-1, ry=ry):
            return (v * ry).sum(axis=axis) / np.linalg.norm(v, axis=axis)

        test = permutation_test((rx,), rho_of, permutation_type="pairings", vectorized=True,
                                alternative="two-sided",
                                n_resamples=np.inf if len(x) <= 8 else 9999,
                                rng=np.random.default_rng(0))
        out[f"spearman_fall_vs_{name}"] = rho
        out[f"spearman_fall_vs_{name}_p"] = float(test.pvalue)
    return out


def _ordering_text(summary: dict) -> str:
    o = summary["ordering"]
    parts = [f"Spearman ρ of the mean fall with the RM's {k.split('_vs_')[1]}: {v:+.2f} "
             f"(permutation p = {o[k + '_p']:.2g})"
             for k, v in o.items() if k.startswith("spearman") and not k.endswith("_p")]
    if summary["best_control_fall"] is not None:
        parts.append(f"strongest control: {100 * summary['best_control_fall']:.1f}%")
    return "; ".join(parts) + "." if parts else "No ordering: fewer than two trained RMs."


def _curve(rows: pd.DataFrame) -> dict:
    cols = [c for c in ("true_kl", "true_kl_per_token", "true_kl_fall") if c in rows.columns]
    mean = rows.groupby("step")[cols].mean().sort_index()
    return {"step": mean.index.tolist(), **{c: mean[c].tolist() for c in cols}}


def _num(g: pd.DataFrame, col: str) -> float | None:
    v = float(g[col].iloc[0]) if col in g.columns else math.nan
    return v if np.isfinite(v) else None


def _finite(v):
    """The summary with NaN and infinities as None (JSON has no NaN)."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _none(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _g(v: float | None) -> str:
    return "–" if v is None else f"{v:.3g}"
