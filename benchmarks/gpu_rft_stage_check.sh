#!/usr/bin/env bash
# The RFT stage on a GPU: `polar-train generate` of a small world, `polar-train pretrain` of
# a reward model, then `polar-train rft` (bf16, DeepSpeed over NCCL): one uninterrupted run,
# the same run SIGKILLed after its first checkpoint and resumed (their metrics compared row
# by row), and an oracle-reward run (PPO's arithmetic in bf16: the true KL must fall).
# Part of benchmarks/gpu_rft_check.sh; runs on a CPU too (then fp32).
#
#     bash benchmarks/gpu_rft_stage_check.sh OUTDIR
set -euo pipefail
out=${1:?usage: gpu_rft_stage_check.sh OUTDIR}
PY=${PYTHON:-python3}
mkdir -p "$out"
cat >"$out/pretrain.yaml" <<YAML
data: {dir: $out/world, eval_pairs: 128}
model: {size: t800k}
budget: {tokens: 3e5}
batch: {size: 32}
optim: {lr: 1e-3}
schedule: {eval_points: 2, checkpoint_every: 1000, progress: false}
YAML
cat >"$out/rft.yaml" <<YAML
data: {dir: $out/world}
policy: {init: f0m0, target: f1m0}
reward: {mode: rm, model: $out/rm/model}
rollout: {prompts_per_step: 32, samples_per_prompt: 2}
ppo: {minibatch: 32, kl_coef: 0.1}
budget: {steps: ${RFT_STEPS:-30}}
eval: {prompts: 32, samples_per_prompt: 4}
schedule: {eval_points: 3, checkpoint_every: 10, progress: false}
YAML
polar() { $PY -m polar_scaling.cli "$@"; }
[ -f "$out/world/manifest.json" ] || polar generate benchmarks/gpu_world.yaml --run-dir "$out/world"
[ -f "$out/rm/done.json" ] || polar pretrain "$out/pretrain.yaml" --run-dir "$out/rm"
rm -rf "$out/rft_full" "$out/rft_resumed" "$out/rft_oracle"
t0=$SECONDS
polar rft "$out/rft.yaml" --run-dir "$out/rft_full"
echo "uninterrupted run: $((SECONDS - t0)) s"
# python itself in the background (not the shell function), so that kill reaches it
$PY -m polar_scaling.cli rft "$out/rft.yaml" --run-dir "$out/rft_resumed" &
pid=$!
checkpointed=
for _ in $(seq 900); do
    ls "$out/rft_resumed/checkpoints/critic/"*/COMPLETE >/dev/null 2>&1 && checkpointed=1 && break
    [ -n "$(jobs -rp)" ] || break
    sleep 0.2
done
if [ -n "$(jobs -rp)" ]; then
    kill -9 $pid
    if [ -n "$checkpointed" ]; then
        echo "killed the second run after its first checkpoint"
    else
        echo "WARNING: no checkpoint within 180 s; killed anyway, so the relaunch starts afresh"
    fi
fi
wait $pid 2>/dev/null || echo "second run's first attempt exited with $?"
[ -f "$out/rft_resumed/done.json" ] && echo "WARNING: the first attempt finished before the kill"
echo "checkpoints before the relaunch: $(ls "$out/rft_resumed/checkpoints/actor" | tr '\n' ' ')"
polar rft "$out/rft.yaml" --run-dir "$out/rft_resumed"
polar rft "$out/rft.yaml" reward.mode=oracle ppo.kl_coef=0 optim.lr=1e-2 \
    --run-dir "$out/rft_oracle"
$PY - "$out" <<'PYEOF'
import json, math, pathlib, sys
out = pathlib.Path(sys.argv[1])
def rows(run):
    return [json.loads(x) for x in (out / run / "metrics.jsonl").read_text().splitlines() if x]
full, resumed = rows("rft_full"), rows("rft_resumed")
print("ds_config bf16:", json.loads((out / "rft_full" / "ds_config.json").read_text()).get("bf16"))
done = json.loads((out / "rft_full" / "done.json").read_text())
print("done.json:", {k: v for k, v in done.items() if not isinstance(v, dict)})
for r in full:
    if "true_kl" in r:
        print("true KL", {k: r[k] for k in ("step", "true_kl", "true_kl_per_token", "true_kl_to_init")})
same_keys = len(full) == len(resumed) and all(a.keys() == b.keys() for a, b in zip(full, resumed))
diff = max((abs(a[k] - b[k]) for a, b in zip(full, resumed) for k in a
            if isinstance(a[k], float) and k in b and math.isfinite(a[k])), default=float("nan"))
exact = full == resumed
print(f"resume: {len(full)} rows vs {len(resumed)}, same keys {same_keys}, identical {exact}, "
      f"max abs difference {diff:.3g}")
if not exact:
    for a, b in zip(full, resumed):
        if a != b:
            print("first differing row:", a, "\n                   :", b)
            break
oracle = json.loads((out / "rft_oracle" / "done.json").read_text())
print("oracle: true KL", oracle.get("initial_true_kl"), "->", oracle.get("final_true_kl"),
      "fall", oracle.get("true_kl_fall"))
PYEOF
