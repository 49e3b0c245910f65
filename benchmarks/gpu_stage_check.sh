#!/usr/bin/env bash
# The training stage itself on a GPU: `polar-train generate` of a small world, then
# `polar-train pretrain` with packed batches, the polar_varlen kernel, bf16 and DeepSpeed
# over NCCL, killed mid-way and resumed. Prints the run's last metrics. Part of
# benchmarks/gpu_check.sh; runs on a CPU too (then fp32, padded-equivalent kernels).
#
#     bash benchmarks/gpu_stage_check.sh OUTDIR
set -euo pipefail
out=${1:?usage: gpu_stage_check.sh OUTDIR}
PY=${PYTHON:-python3}
mkdir -p "$out"
cat >"$out/pretrain.yaml" <<EOF
data: {dir: $out/world, eval_pairs: 128}
model: {size: t800k, attention: polar_varlen}
budget: {tokens: 3e5}
batch: {size: 32, packing: "on"}
optim: {lr: 1e-3}
schedule: {eval_points: 4, checkpoint_every: 10, progress: false}
EOF
polar() { $PY -m polar_scaling.cli "$@"; }
[ -f "$out/world/manifest.json" ] || polar generate benchmarks/gpu_world.yaml --run-dir "$out/world"
rm -rf "$out/rm"
# Kill the first attempt once a checkpoint exists, then resume on the same directory.
# (python itself in the background, not the shell function: kill must reach the trainer)
$PY -m polar_scaling.cli pretrain "$out/pretrain.yaml" --run-dir "$out/rm" &
pid=$!
for _ in $(seq 600); do
    ls "$out/rm/checkpoints/"*/COMPLETE >/dev/null 2>&1 && break
    [ -n "$(jobs -rp)" ] || break  # the first attempt ended by itself
    sleep 0.2
done
if [ -n "$(jobs -rp)" ]; then
    kill -9 $pid && echo "killed the first attempt after its first checkpoint"
fi
wait $pid 2>/dev/null || echo "first attempt exited with $?"
[ -f "$out/rm/done.json" ] && echo "WARNING: the first attempt finished before the kill"
echo "checkpoints before the relaunch: $(ls "$out/rm/checkpoints" 2>/dev/null | tr '\n' ' ')"
polar pretrain "$out/pretrain.yaml" --run-dir "$out/rm"
$PY - "$out/rm" <<'EOF'
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
done = json.loads((run / "done.json").read_text())
lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
evals = [x for x in lines if "eval_loss" in x]
print("done.json:", json.dumps(done)[:400])
print("layout:", {k: done.get(k) for k in ("packing", "attention", "compact_rows", "micro",
                                           "micro_from", "micro_token_budget", "gpu_gib")})
print("ds_config bf16:", json.loads((run / "ds_config.json").read_text()).get("bf16"))
for x in evals:
    print({k: x[k] for k in ("step", "tokens", "eval_loss", "eval_accuracy") if k in x})
perf = run / "perf.jsonl"
if perf.is_file():
    print("perf (last):", perf.read_text().splitlines()[-1][:400])
EOF
