#!/usr/bin/env bash
# One-shot GPU check for the packed training path, sized to run once in about 8 minutes on
# one H100/H200 (see docs/gpu.md). Run from the repository root:
#
#     bash benchmarks/gpu_check.sh            # results and logs in $OUT (default /tmp/gpu_check)
#
# If a .whl/ folder is present, its wheels (deepspeed 0.19.8 and its pure-python
# dependencies the image lacks, liger-kernel) are installed into /tmp/site first. Every step is guarded
# and time-boxed: a failure prints its error and the script goes on; steps that would not
# finish inside CHECK_BUDGET_S (default 390 s) are skipped, and say so.

set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
BUDGET=${CHECK_BUDGET_S:-390}
source benchmarks/gpu_env.sh
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
START=$SECONDS

# 1. Environment -------------------------------------------------------------------------
echo "=== environment"
nvidia-smi || echo "nvidia-smi failed"
install_wheels
step versions 60 $PY - <<'EOF'
import importlib, importlib.util, inspect, platform
print("python", platform.python_version())
for name in ["torch", "transformers", "triton", "deepspeed", "flash_attn", "liger_kernel",
             "pydantic", "hjson"]:
    try:
        m = importlib.import_module(name)
        print(f"{name:>12} {getattr(m, '__version__', '?')}  {m.__file__}")
    except Exception as e:
        print(f"{name:>12} NOT IMPORTABLE: {type(e).__name__}: {e}")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
try:
    from torch.nn.attention.varlen import varlen_attn
    print("varlen_attn", inspect.signature(varlen_attn))
except Exception as e:
    print("varlen_attn unavailable:", e)
print("flex_attention", importlib.util.find_spec("torch.nn.attention.flex_attention") is not None)
EOF

# 2. 1.8B throughput on POLAR-like data (responses up to 4,096 tokens, rows of 16,384).
#    Ordered by what the figures are needed for; the budget skips the tail.
M="$PY benchmarks/gpu_mfu.py --size 1.8B --warmup 2 --steps 4 --attn polar_varlen --zero 0"
# Which of these run: CHECK_RUNS (space-separated names; default all, in this order).
RUNS=${CHECK_RUNS:-"compile_layers_nockpt_ga4_tight_both liger_nockpt_ga4_tight compile_layers_nockpt_ga4_tight_r24k none_nockpt_ga4_both compile_layers_nockpt_ga4"}
for r in $RUNS; do
    case $r in
        # The plain padded loop and our packed path in the same process: the ratio.
        none_nockpt_ga4_both) step mfu_$r 150 $M --no-ckpt --grad-accum 4 --fused none --mode both \
            --json "$OUT/mfu_$r.json" ;;
        liger_nockpt_ga4) step mfu_$r 100 $M --no-ckpt --grad-accum 4 --fused liger --mode packed \
            --profile --json "$OUT/mfu_$r.json" ;;
        compile_nockpt_ga4) step mfu_$r 170 $M --no-ckpt --grad-accum 4 --fused compile \
            --mode packed --json "$OUT/mfu_$r.json" ;;
        compile_layers_nockpt_ga4) step mfu_$r 170 $M --no-ckpt --grad-accum 4 \
            --fused compile_layers --mode packed --json "$OUT/mfu_$r.json" ;;
        liger_ckpt_ga4) step mfu_$r 90 $M --ckpt --grad-accum 4 --fused liger --mode packed \
            --json "$OUT/mfu_$r.json" ;;
        none_nockpt_ga1) step mfu_$r 70 $M --no-ckpt --grad-accum 1 --fused none --mode packed \
            --json "$OUT/mfu_$r.json" ;;
        liger_nockpt_ga4_tight) step mfu_$r 100 $M --no-ckpt --grad-accum 4 --fused liger \
            --mode packed --tight --json "$OUT/mfu_$r.json" ;;
        # The best packed configuration and the plain padded loop in one process: the ratio.
        compile_layers_nockpt_ga4_tight_both) step mfu_$r 220 $M --no-ckpt --grad-accum 4 \
            --fused compile_layers --mode both --tight --json "$OUT/mfu_$r.json" ;;
        # Rows of 24,576 tokens: fewer, larger matmuls per micro-batch.
        compile_layers_nockpt_ga4_tight_r24k) step mfu_$r 170 $M --no-ckpt --grad-accum 4 \
            --fused compile_layers --mode packed --tight --row-tokens 24576 \
            --json "$OUT/mfu_$r.json" ;;
        compile_layers_nockpt_ga4_tight_r24k_both) step mfu_$r 220 $M --no-ckpt --grad-accum 4 \
            --fused compile_layers --mode both --tight --row-tokens 24576 \
            --json "$OUT/mfu_$r.json" ;;
        liger_nockpt_ga4_tight_r24k) step mfu_$r 100 $M --no-ckpt --grad-accum 4 --fused liger \
            --mode packed --tight --row-tokens 24576 --json "$OUT/mfu_$r.json" ;;
        compile_layers_nockpt_ga4_tight) step mfu_$r 170 $M --no-ckpt --grad-accum 4 \
            --fused compile_layers --mode packed --tight --json "$OUT/mfu_$r.json" ;;
        none_nockpt_ga4_profile) step mfu_$r 100 $M --no-ckpt --grad-accum 4 --fused none \
            --mode packed --profile --json "$OUT/mfu_$r.json" ;;
        *) echo "unknown run $r" ;;
    esac
done

# 3. Kernel correctness on packed bf16 rows + tiny bf16 DeepSpeed (NCCL, world size 1) smoke,
#    and the training stage itself (generate, packed pretrain killed and resumed).
if [ -z "${CHECK_SKIP_SMOKE:-}" ]; then
    step kernels_smoke 100 $PY benchmarks/packed_kernels.py --kernels sdpa,eager,polar_varlen \
        --json "$OUT/kernels_smoke.json"
    step stage_check 120 bash benchmarks/gpu_stage_check.sh "${STAGE_DIR:-/tmp/gpu_stage_check}"
fi

# 4. Summary table -----------------------------------------------------------------------
echo "=== summary (t=$((SECONDS - START))s)"
cat "$OUT/steps.txt"
$PY - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"{'run':<30}{'loop':>7}{'fused':>15}{'ckpt':>5}{'ga':>3}{'real tok/s':>11}{'TFLOP/s':>8}"
      f"{'MFU':>7}{'pad':>6}{'GiB':>6}{'step s':>7}{'ratio':>6}")
for f in sorted(out.glob("mfu_*.json")):
    r = json.loads(f.read_text())
    for loop in ("packed", "padded"):
        if loop not in r:
            continue
        x = r[loop]
        mfu = f"{x['mfu']:.1%}" if x.get("mfu") is not None else "n/a"
        ratio = f"{r['ratio_real_tokens_per_s']:.2f}" if loop == "packed" and \
            "ratio_real_tokens_per_s" in r else ""
        print(f"{f.stem[4:]:<30}{loop:>7}{x.get('fused_kernels', '-'):>15}"
              f"{'y' if x.get('activation_checkpointing') else 'n':>5}{x.get('grad_accum', 1):>3}"
              f"{x['real_tokens_per_s']:>11.0f}{x['model_tflops_per_s']:>8.1f}{mfu:>7}"
              f"{x['pad_share']:>6.1%}{x.get('mem_peak_gib', 0):>6.1f}"
              f"{x['step_seconds_median']:>7.2f}{ratio:>6}")
EOF
echo "=== done in $((SECONDS - START))s; JSON and logs in $OUT (all of them in $OUT/all.tgz)"
# One archive as well: a device tool that brings back only a few files gets it first.
(cd "$OUT" && tar czf all.tgz --exclude=all.tgz -- *.json *.log *.txt 2>/dev/null) || true
