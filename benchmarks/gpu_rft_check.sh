#!/usr/bin/env bash
# One-shot GPU check of the RFT stage, sized to run in about 6 minutes on one H100/H200
# (see docs/rft.md, "On a GPU"). Run from the repository root:
#
#     bash benchmarks/gpu_rft_check.sh       # results and logs in $OUT (default /tmp/gpu_rft_check)
#
# 1. `benchmarks/gpu_rft_stage_check.sh`: generate → pretrain → rft in bf16 over NCCL, a run
#    killed after its first checkpoint and resumed against an uninterrupted one, an oracle run;
# 2. `benchmarks/rft_throughput.py` on the world's tiny policies, then on random policies and
#    RM of RFT_POLICY_SIZE (default 100M) with 256 fixed-length rollouts of 128 tokens per
#    step: the stage against a plain loop in the same process, and the update phase's MFU;
# 3. meanwhile, when runs/rft_bridges16k/data is present (carried): a base LM of the RFT
#    experiment's xl size (t400k) on that world's text with LM_TOKENS tokens (default 64M, 8x
#    the largest CPU one) in batches of LM_BATCH rows; its model folder comes back in $OUT.
# Every step is time-boxed to what is left of CHECK_BUDGET_S (default 420 s).
set -u
OUT=${OUT:-/tmp/gpu_rft_check}
mkdir -p "$OUT"
BUDGET=${CHECK_BUDGET_S:-420}
source benchmarks/gpu_env.sh
exec > >(tee -a "$OUT/gpu_rft_check.log") 2>&1
START=$SECONDS
SIZE=${RFT_POLICY_SIZE:-100M}

echo "=== environment"
nvidia-smi || echo "nvidia-smi failed"
install_wheels
step versions 60 $PY -c "
import torch, transformers, deepspeed
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and
      torch.cuda.get_device_name())
print('transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"

lm_pid=
if [ -d runs/rft_bridges16k/data ] && [ -z "${CHECK_SKIP_LM:-}" ]; then
    tokens=${LM_TOKENS:-6.4e7}
    cat >"$OUT/lm.yaml" <<YAML
size: t400k
data: {dir: runs/rft_bridges16k/data, seq_len: 128, eval_rows: 64}
budget: {tokens: $tokens}
batch: {size: ${LM_BATCH:-256}}
optim: {lr: 0.003, min_lr_ratio: 0.1, warmup_ratio: 0.03, weight_decay: 0.0, beta1: 0.9,
        beta2: 0.95, grad_clip: 1.0}
schedule: {eval_points: 6, eval_first_fraction: 0.01, checkpoint_every: 100000, log_every: 5,
           progress: false}
YAML
    echo "=== base LM in the background ($tokens tokens, batch ${LM_BATCH:-256})"
    (t0=$SECONDS
     timeout --kill-after=10 $((BUDGET - 60)) $PY -m polar_scaling.cli lm "$OUT/lm.yaml" \
         --run-dir /tmp/gpu_rft_lm >"$OUT/lm.log" 2>&1
     echo "lm rc=$? seconds=$((SECONDS - t0))" >>"$OUT/steps.txt") &
    lm_pid=$!
fi

step rft_stage 220 bash benchmarks/gpu_rft_stage_check.sh "${STAGE_DIR:-/tmp/gpu_rft_stage}"
if [ -n "$lm_pid" ]; then
    echo "=== waiting for the base LM (t=$((SECONDS - START))s)"
    wait $lm_pid
    mkdir -p "$OUT/lm"
    cp -r /tmp/gpu_rft_lm/model /tmp/gpu_rft_lm/done.json /tmp/gpu_rft_lm/metrics.jsonl \
        "$OUT/lm/" 2>/dev/null || echo "the base LM left no model"
    grep eval_lm_loss /tmp/gpu_rft_lm/metrics.jsonl 2>/dev/null | tail -3
    tail -c 600 /tmp/gpu_rft_lm/done.json 2>/dev/null; echo
fi
step throughput_world 100 $PY benchmarks/rft_throughput.py --steps 4 --blocks 2 \
    --json "$OUT/throughput_world.json"
step "throughput_$SIZE" 170 $PY benchmarks/rft_throughput.py --policy-size "$SIZE" \
    --rm-size "$SIZE" --max-new-tokens 128 --fixed-length --prompts-per-step 64 \
    --samples-per-prompt 4 --minibatch 64 --steps 2 --blocks 2 \
    --json "$OUT/throughput_$SIZE.json"

echo "=== summary (t=$((SECONDS - START))s)"
cat "$OUT/steps.txt"
$PY - "$OUT" <<'PYEOF'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("throughput_*.json")):
    r = json.loads(f.read_text())
    for path in ("stage", "plain"):
        x = r[path]
        mfu = x.get("update_mfu")
        print(f"{f.stem:<22}{path:>6} rollout tok/s {x['rollout_tokens_per_s']:>9.0f}  step "
              f"{x['step_s']:.3f} s  update {x['ppo_s']:.3f} s"
              + (f"  update {x['update_model_tflops_per_s']:.1f} TFLOP/s" if
                 "update_model_tflops_per_s" in x else "")
              + (f"  MFU {mfu:.1%}" if mfu is not None else ""))
    print(f"{'':<22}stage/plain: step {r['step_time_ratio']:.2f}, update "
          f"{r['ppo_time_ratio']:.2f}, rollout {r['rollout_time_ratio']:.2f} "
          f"({r['device']}, stage {r['stage_precision']})")
PYEOF
for run in "${STAGE_DIR:-/tmp/gpu_rft_stage}"/rft_*; do
    for f in done.json metrics.jsonl; do
        [ -f "$run/$f" ] && cp "$run/$f" "$OUT/$(basename "$run")_$f"
    done
done
echo "=== done in $((SECONDS - START))s"
