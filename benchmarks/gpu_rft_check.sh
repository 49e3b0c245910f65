#!/usr/bin/env bash
# One-shot GPU check of the RFT stage, sized for at most 8 minutes on one H100/H200 (see
# docs/rft.md, "On a GPU"). Run from the repository root:
#
#     bash benchmarks/gpu_rft_check.sh       # results and logs in $OUT (default /tmp/gpu_rft_check)
#
# 1. `benchmarks/rft_throughput.py` on random policies and RM of RFT_POLICY_SIZE (default
#    100M) with 256 fixed-length rollouts of 128 tokens per step: the stage against a plain
#    loop in the same process, and the update phase's model FLOP/s and MFU;
# 2. `benchmarks/gpu_rft_stage_check.sh`: generate → pretrain → rft in bf16 over NCCL, a run
#    killed after its first checkpoint and resumed against an uninterrupted one, an oracle run;
# 3. `benchmarks/rft_throughput.py` on the world's tiny policies.
# Every step is time-boxed to what is left of CHECK_BUDGET_S (default 480 s); results of an
# earlier run in the same $OUT are removed first.
set -u
OUT=${OUT:-/tmp/gpu_rft_check}
mkdir -p "$OUT"
BUDGET=${CHECK_BUDGET_S:-480}
source benchmarks/gpu_env.sh
rm -f "$OUT"/steps.txt "$OUT"/throughput_*.json "$OUT"/rft_*_done.json "$OUT"/rft_*_metrics.jsonl
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

step "throughput_$SIZE" 170 $PY benchmarks/rft_throughput.py --policy-size "$SIZE" \
    --rm-size "$SIZE" --max-new-tokens 128 --fixed-length --prompts-per-step 64 \
    --samples-per-prompt 4 --minibatch 64 --steps 2 --blocks 2 \
    --json "$OUT/throughput_$SIZE.json"

step rft_stage 220 bash benchmarks/gpu_rft_stage_check.sh "${STAGE_DIR:-/tmp/gpu_rft_stage}"
step throughput_world 100 $PY benchmarks/rft_throughput.py --steps 4 --blocks 2 \
    --json "$OUT/throughput_world.json"
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
