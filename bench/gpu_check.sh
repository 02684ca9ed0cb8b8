#!/usr/bin/env bash
# The one-command GPU check: on a machine with a CUDA GPU, build the extension, run the CUDA tests,
# check every op against float64 (small shapes, then the layer shapes at batch 64 in fp32 and
# bf16), and benchmark ops and models (eager, torch.compile, fused; SDPA for the attention).
# Results go to bench/results/gpu_<device>_* (or $GPU_CHECK_OUT). Every step runs under a time
# limit inside one overall budget ($GPU_CHECK_BUDGET_S, default 470 s: a lent GPU has 15 minutes in
# all, start-up included), prints what it is doing as it goes, and the run goes on past a failed
# step. Exit 2 when no CUDA device is present, 1 when a step failed, 0 otherwise.
#
#   bash bench/gpu_check.sh                  # everything the budget allows, in priority order
#   GPU_CHECK_SKIP_BUILD=1 bash bench/gpu_check.sh   # the extension is already built
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-470}
PY=${PYTHON:-python3}
NPROC=$(nproc 2>/dev/null || echo 4)
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$NPROC}

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
log() { echo "[gpu_check $(printf '%4d' "$(elapsed)") s] $*"; }

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" 2>/dev/null; then
    log "no CUDA device is present (torch.cuda.is_available() is False, or torch is missing): nothing to check"
    exit 2
fi
DEV=$("$PY" -c "import torch, re; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
CAP=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
OUTDIR=${GPU_CHECK_OUT:-bench/results}
mkdir -p "$OUTDIR"
P="$OUTDIR/gpu_${DEV}"
log "device $DEV (sm_${CAP/./}), $NPROC CPU cores, budget ${BUDGET} s, results in ${P}_*"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,power.limit,driver_version \
    --format=csv > "${P}_nvidia_smi.csv" 2>&1 || true

# run NAME CAP CMD...: CMD under a limit of min(CAP, what is left - 5) seconds; skipped under 15 s.
run() {
    local name=$1 cap=$2; shift 2
    local lim; lim=$(left); lim=$(( lim - 5 < cap ? lim - 5 : cap ))
    if [ "$lim" -lt 15 ]; then log "SKIP  $name (budget spent)"; echo skipped > "$RC/$name"; return 0; fi
    log "START $name (limit ${lim} s): $*"
    timeout --kill-after=5 "$lim" "$@" > "${P}_${name}.log" 2>&1
    local rc=$?
    echo "$rc" > "$RC/$name"
    if [ $rc -eq 0 ]; then log "OK    $name"
    else log "FAIL  $name (exit $rc$([ $rc -eq 124 ] && echo ', timed out'))"; tail -n 15 "${P}_${name}.log" | sed 's/^/    /'; fi
    return 0
}
RC=$(mktemp -d)  # one file per step: its exit status (background steps report through it too)

# 1. Build (objects kept in ./build, so a second run rebuilds only what changed). ptxas -v gives
#    each CUDA kernel's registers, stack frame and spill bytes.
if [ "${GPU_CHECK_SKIP_BUILD:-0}" != 1 ]; then
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$CAP} NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} -Xptxas=-v" \
        run build 300 "$PY" -m pip install -v -e . --no-build-isolation --no-deps
    grep -E "ptxas info|bytes stack frame|Compiling entry" "${P}_build.log" > "${P}_ptxas.txt" 2>/dev/null || true
fi
run info 60 "$PY" -m fastvit_ops info --device cuda

# 2. Correctness, in parallel (nothing here is timed): the CUDA tests, one process per file so a
#    kernel fault in one cannot take the others down, and `check` at small and at layer shapes.
#    Meanwhile two more processes run the benchmarks once (--reps 1) so that torch.compile's on-disk
#    caches are warm when step 3 times them.
OPS_SHAPES="FAT-B0,FCViT-tiny,CvT-13,sweep"
# The "fused" column of bench runs the requested backend: under auto, CUDA inputs run eager PyTorch
# (our kernels measured slower on the first run), so time our kernels explicitly.
BENCH_BACKEND=${GPU_CHECK_BACKEND:-triton}
pids=()
bg() { run "$@" & pids+=($!); }
for f in tests/ops/test_*.py; do
    grep -q "requires_cuda" "$f" || continue
    n=$(basename "$f" .py)
    bg "pytest_${n#test_}" 150 "$PY" -m pytest -q -p no:cacheprovider -k cuda "$f" -o addopts="" -ra
done
bg check_small 150 "$PY" -m fastvit_ops check --device cuda --json "${P}_check_small.json"
bg check_fp32 180 "$PY" -m fastvit_ops check --device cuda --real-shapes --batch 64 --dtype fp32 --verbose \
    --json "${P}_check_batch64_fp32.json"
bg check_bf16 180 "$PY" -m fastvit_ops check --device cuda --real-shapes --batch 64 --dtype bf16 --verbose \
    --json "${P}_check_batch64_bf16.json"
bg warm_ops 180 env FASTVIT_OPS_BACKEND="$BENCH_BACKEND" "$PY" -m fastvit_ops bench --device cuda --batch 64 --no-models --shapes "$OPS_SHAPES" --reps 1 \
    --json "${P}_warm_ops.json"
bg warm_models 180 env FASTVIT_OPS_BACKEND="$BENCH_BACKEND" "$PY" -m fastvit_ops bench --device cuda --batch 64 --no-ops --reps 1 --json "${P}_warm_models.json"
for pid in "${pids[@]}"; do wait "$pid"; done

# 3. Timing, one process at a time so nothing else runs on the GPU: ops in fp32, models
#    (inference), ops in bf16, models under bf16 autocast with a training step.
run bench_ops_fp32 150 env FASTVIT_OPS_BACKEND="$BENCH_BACKEND" "$PY" -m fastvit_ops bench --device cuda --batch 64 --no-models --shapes "$OPS_SHAPES" \
    --verbose --json "${P}_bench_ops_fp32.json" --plot "${P}_bench_ops_fp32.png"
run bench_models_fp32 200 env FASTVIT_OPS_BACKEND="$BENCH_BACKEND" "$PY" -m fastvit_ops bench --device cuda --batch 64 --no-ops --verbose \
    --json "${P}_bench_models_fp32.json" --plot "${P}_bench_models_fp32.png"
run bench_ops_bf16 200 env FASTVIT_OPS_BACKEND="$BENCH_BACKEND" "$PY" -m fastvit_ops bench --device cuda --batch 64 --no-models --shapes "$OPS_SHAPES" \
    --dtype bf16 --verbose --json "${P}_bench_ops_bf16.json"
run bench_models_bf16 200 env FASTVIT_OPS_BACKEND="$BENCH_BACKEND" "$PY" -m fastvit_ops bench --device cuda --batch 64 --no-ops --autocast bf16 --train \
    --verbose --json "${P}_bench_models_bf16_autocast.json"
rm -f "${P}_warm_ops.json" "${P}_warm_models.json"

FAILED=()
for f in "$RC"/*; do [ "$(cat "$f")" = 0 ] || FAILED+=("$(basename "$f"):$(cat "$f")"); done
log "done in $(elapsed) s"
if [ ${#FAILED[@]} -gt 0 ]; then log "failed or skipped (step:exit): ${FAILED[*]}"; exit 1; fi
exit 0
