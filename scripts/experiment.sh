#!/usr/bin/env bash
# The embedded POLAR scaling-law experiment, end to end:
#   sweep (data -> base LMs -> reward models) -> results table -> fits and plots -> summary.
# usage: scripts/experiment.sh [SWEEP.yaml] [sweep overrides ...]   (make demo runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
SWEEP=${1:-sweeps/tiny.yaml}
shift || true
start=$SECONDS
root=$("$BIN/python" - "$SWEEP" "$@" <<'PY'
import sys
from polar_scaling.sweep.spec import load_sweep
print(load_sweep(sys.argv[1], sys.argv[2:]).root)
PY
)
fits="$root/fits"

echo "== 1/3 sweep $SWEEP -> $root"
# A failed run is reported by launch (with its log) and left out of the fits; the rest go on.
"$BIN/polar-sweep" launch "$SWEEP" "$@" --wait || echo "some runs failed: see polar-sweep status $SWEEP"
"$BIN/polar-sweep" collect "$SWEEP" "$@"

echo "== 2/3 fits -> $fits"
fit() { "$BIN/polar-analyze" fit "$root/results.csv" --out "$fits/$1" "${@:2}" > "$fits/$1.log" 2>&1 \
        || { echo "fit $1 failed:"; tail -5 "$fits/$1.log"; }; }
mkdir -p "$fits"
fit compute_power --form power --x compute --envelope
fit compute_saturating --form saturating --x compute --envelope
# N is the non-embedding parameter count, as in the compute formula (polar_scaling/sizes.py).
fit params_power --form power --x params --params non_embedding_params --final-only
fit params_extrapolation --form power --x params --params non_embedding_params --final-only \
    --holdout-largest 1

echo "== 3/3 summary ($((SECONDS - start)) s)"
"$BIN/python" - "$fits" <<'PY'
import json, sys
from pathlib import Path
fits = Path(sys.argv[1])
def show(name, title):
    f = fits / name / "fit.json"
    if not f.is_file():
        print(f"{title:<34} (no fit: see {fits / name}.log)")
        return None
    r = json.loads(f.read_text())
    p = r.get("params", r)
    if "E" in p:
        law = f"L = {p['E']:.4g} + {p['A']:.4g}·X^-{p['alpha']:.4g}"
    else:
        law = f"L = {p['a']:.4g}·X^{p['b']:.4g}"
    pr = r.get("pearson_r")
    extra = f"  Pearson r {pr:.4f}" if pr is not None else ""
    print(f"{title:<34} {law:<34} R² {r['r2']:.4f}{extra}  (n={r['n_points']})")
    return r
show("compute_power", "loss vs compute (envelope)")
show("compute_saturating", "loss vs compute, saturating")
show("params_power", "final loss vs parameters")
r = show("params_extrapolation", "fit without the largest rung")
if r and r.get("extrapolation"):
    print("extrapolation to the largest rung:", json.dumps(r["extrapolation"], default=str)[:300])
print(f"reports and plots: {fits}/*/report.md, *.png, *.pdf")
PY
