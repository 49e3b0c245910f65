# Sourced by the GPU check scripts (benchmarks/gpu_check.sh, gpu_rft_check.sh): offline
# environment, the carried wheels, and `step NAME TIMEOUT_S COMMAND...`, which runs a
# command time-boxed to what is left of $BUDGET seconds since $START, logs it to
# $OUT/NAME.log and records its exit code in $OUT/steps.txt.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
unset DS_ACCELERATOR  # the Makefile's CPU default must not reach the GPU run
PY=${PYTHON:-python3}

# Wheels in .whl/ (deepspeed and the pure-python dependencies the image lacks, liger-kernel)
# go to /tmp/site, ahead of the image's own packages.
install_wheels() {
    if [ -d .whl ]; then
        echo "installing $(ls .whl | wc -l) wheels from .whl/ into /tmp/site"
        $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
            || echo "wheel install failed"
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
}

step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if ((left < 20)); then
        echo "=== $name: SKIPPED (${left}s of the ${BUDGET}s budget left)"
        echo "$name skipped" >>"$OUT/steps.txt"
        return
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (timeout ${limit}s, t=$((SECONDS - START))s)"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: rc=$rc in $((SECONDS - t0))s"
    echo "$name rc=$rc seconds=$((SECONDS - t0))" >>"$OUT/steps.txt"
}
