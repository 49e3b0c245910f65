#!/usr/bin/env bash
# The embedded POLAR scaling-law experiment, end to end:
#   sweep (data -> base LMs -> reward models) -> results table -> fits and plots -> summary.
# usage: scripts/experiment.sh [SWEEP.yaml] [sweep overrides ...]   (make demo runs it)
#   EXECUTOR=slurm|local: how the sweep runs; default slurm where `sbatch` is on PATH and a
#   controller answers (`sinfo`), else local (this machine, launch.parallelism jobs at a time)
#   SEED=N: fit only the runs of seed N, into ROOT/fits-seedN (the runs of other seeds stay in
#   the table): e.g. SEED=1 scripts/experiment.sh sweeps/tiny.yaml 'grid.seeds=[0,1]'
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
SWEEP=${1:-sweeps/tiny.yaml}
shift || true
start=$SECONDS
# The sweep root and its largest token budget: final loss against N is fitted at equal
# tokens (the largest budget), since final losses of different budgets are different laws.
read -r root budget < <("$BIN/python" - "$SWEEP" "$@" <<'PY'
import sys
from polar_scaling.sweep.spec import load_sweep
s = load_sweep(sys.argv[1], sys.argv[2:])
print(s.root, max(r.tokens for r in s.runs if r.role == "run"))
PY
)
fits="$root/fits${SEED:+-seed$SEED}"
seed_q=${SEED:+ and seed == $SEED}

if [[ -z ${EXECUTOR:-} ]] && command -v sbatch >/dev/null && ! timeout 30 sinfo -h >/dev/null 2>&1; then
    EXECUTOR=local
    echo "sbatch is here but no Slurm controller answers: the sweep runs on this machine"
fi
echo "== 1/3 sweep $SWEEP -> $root${EXECUTOR:+ (executor $EXECUTOR)}"
# A failed run is reported by launch (with its log) and left out of the fits; the rest go on.
"$BIN/polar-sweep" launch "$SWEEP" "$@" ${EXECUTOR:+--executor "$EXECUTOR"} --wait \
    || echo "some runs failed: see polar-sweep status $SWEEP"
"$BIN/polar-sweep" collect "$SWEEP" "$@"

echo "== 2/3 fits -> $fits"
fit() { "$BIN/polar-analyze" fit "$root/results.csv" --out "$fits/$1" "${@:2}" \
        > "$fits/$1.log" 2>&1 \
        || { echo "fit $1 failed:"; tail -5 "$fits/$1.log"; }; }
mkdir -p "$fits"
all=(--where "budget_tokens > 0$seed_q")
fit compute_power --form power --x compute --envelope "${all[@]}"
fit compute_saturating --form saturating --x compute --envelope "${all[@]}"
# The envelope of finished runs only: a cosine run's loss before its schedule ends is above
# what a run of that length reaches (Hoffmann et al. 2022, app. A), so the envelope of every
# evaluation mixes un-annealed points into the middle of the curve (docs/experiment.md).
fit compute_final --form power --x compute --envelope --final-only "${all[@]}"
# N is the non-embedding parameter count, as in the compute formula (polar_scaling/sizes.py).
final=(--x params --params non_embedding_params --final-only --where "budget_tokens == $budget$seed_q")
fit params_power --form power "${final[@]}"
fit params_extrapolation --form power "${final[@]}" --holdout-largest 1

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
    ci = r.get("ci", {}).get("alpha" if "E" in p else "b")
    if ci:
        if "E" in p:  # the saturating law's alpha is the exponent's magnitude: show -alpha
            ci = sorted(-c for c in ci)
        extra += f"  exponent 95% CI [{ci[0]:.4g}, {ci[1]:.4g}]"
    print(f"{title:<34} {law:<34} R² {r['r2']:.4f}{extra}  (n={r['n_points']})")
    return r
show("compute_power", "loss vs compute (envelope)")
show("compute_saturating", "loss vs compute, saturating")
show("compute_final", "loss vs compute (finished runs)")
show("params_power", "final loss vs parameters")
r = show("params_extrapolation", "fit without the largest rung")
x = (r or {}).get("extrapolation")
if x:
    print(f"extrapolation to the largest rung: mean |relative error| "
          f"{100 * x['mean_abs_rel_error']:.2f}%, max {100 * x['max_abs_rel_error']:.2f}% "
          f"({x['n_heldout']} held-out run(s))")
    for pt in x["points"]:
        print(f"  {pt['group']}: observed {pt['observed']:.4f}, predicted {pt['predicted']:.4f} "
              f"[{pt['predicted_lo']:.4f}, {pt['predicted_hi']:.4f}], "
              f"error {100 * pt['rel_error']:+.2f}%")
print(f"reports and plots: {fits}/*/report.md, *.png, *.pdf")
PY
