#!/usr/bin/env bash
# One lease on the GPU machine (issue "prove it on the GPU"), about 9 minutes:
#   versions -> the single-launch kernel's GPU test (its programs wait for each other: a
#   deadlock would show here, under a short timeout) -> the whole test suite on the GPU ->
#   tuning sweep of both fused paths -> softmax-ce-bench at DESIGN.md section 5's shapes
#   with both fused paths as providers (softmax_ce_gpu_two_sweep, softmax_ce_gpu_single
#   and their in-place forms). Everything lands under $OUT. Which path wins at each shape
#   decides kernels/tuning.py's AUTO_SINGLE.
# Run from the repository root:  bash bench/gpu_session.sh
# Carry Liger-Kernel as a wheel in .whl/ (the device README says how); without it the
# liger provider is recorded as skipped. DRYRUN=1 runs every step at toy sizes on CPU.
# A device command runs at most 10 minutes: PART=1 (tests, sanitizers, host-sync check,
# GEMM rate) and PART=2 (sweep and benchmarks) split the session in two commands; the
# default runs both.
set -uo pipefail
REPO=$(pwd)
OUT=${OUT:-$REPO/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
step() { printf '\n===== %s (%s)\n' "$1" "$(date -u +%T)"; }

step "install"
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# the package without pip: softmax_ce_gpu/ with kernels/ and bench/ mapped in, as setuptools does
SHIM=/tmp/sce_shim
rm -rf "$SHIM" && mkdir -p "$SHIM/softmax_ce_gpu"
ln -s "$REPO"/softmax_ce_gpu/*.py "$SHIM/softmax_ce_gpu/"
ln -s "$REPO/kernels" "$SHIM/softmax_ce_gpu/kernels"
ln -s "$REPO/bench" "$SHIM/softmax_ce_gpu/bench"
export PYTHONPATH=$SHIM${PYTHONPATH:+:$PYTHONPATH}
cd /tmp  # so that the repo's softmax_ce_gpu/ (without kernels/) does not shadow the shim

step "versions"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  $PY -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__); print('cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
  git -C "$REPO" log -1 --format='git %H %cd' 2>/dev/null
} | tee "$OUT/versions.txt"

if [ "${DRYRUN:-0}" = 1 ]; then
    TESTS="$REPO/tests/test_bad_input.py"; SHAPES_BF16=8x300,4x1000; SHAPES_FP32=8x300; DEVICE=cpu
else
    TESTS="$REPO/tests"; SHAPES_BF16=8192x128256,4096x256000,32768x32000,16384x128256
    SHAPES_FP32=32768x32000; DEVICE=cuda
fi

PART=${PART:-all}
part() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }

if part 1; then
step "single-launch kernel"
timeout 120 $PY -m pytest "$REPO/tests/test_single_pass.py" -q -x -p no:cacheprovider \
    -k "gpu or full_vocabulary" 2>&1 | tee "$OUT/pytest_single.log" | tail -5
echo "exit status $? (124: timed out, a wait that did not end)" | tee -a "$OUT/pytest_single.log"

step "tests"
timeout 240 $PY -m pytest "$TESTS" -q -x -p no:cacheprovider -n 4 2>&1 | tee "$OUT/pytest.log" | tail -15 \
  || timeout 240 $PY -m pytest "$TESTS" -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -15

step "sanitizers (single-pass kernel)"
if command -v compute-sanitizer >/dev/null 2>&1 && [ "$DEVICE" = cuda ]; then
    for tool_shape in "racecheck 64 32000" "memcheck 16 128256"; do
        set -- $tool_shape
        timeout 90 compute-sanitizer --tool "$1" --print-limit 20 \
            $PY -m softmax_ce_gpu.bench.gpu_checks single "$2" "$3" 2>&1 \
            | tee "$OUT/sanitizer_$1.log" | tail -4
    done
else
    echo "compute-sanitizer or CUDA not available: skipped" | tee "$OUT/sanitizer.log"
fi

step "host syncs (torch.cuda.set_sync_debug_mode('error'), every entry point)"
timeout 120 $PY -m softmax_ce_gpu.bench.gpu_checks sync 2>&1 | tee "$OUT/sync_debug.log" | tail -20

step "bf16 GEMM rate"
timeout 60 $PY -m softmax_ce_gpu.bench.gpu_checks gemm 2>&1 | tee "$OUT/gemm.log"
fi

if part 2; then
step "tuning sweep"
if [ "$DEVICE" = cuda ]; then
    timeout 180 $PY -m softmax_ce_gpu.bench.sweep --shapes 8192x128256,4096x256000,32768x32000 \
        --path both --out "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.log" | tail -8
fi

step "benchmark"
PROVIDERS=softmax_ce_gpu_two_sweep,softmax_ce_gpu_single,softmax_ce_gpu_inplace,softmax_ce_gpu_single_inplace,torch,torch_compile,liger
timeout 240 $PY -m softmax_ce_gpu.bench.cli --device $DEVICE --ops cross_entropy --dtypes bf16 \
    --shapes $SHAPES_BF16 --providers $PROVIDERS --out "$OUT/bench_bf16" 2>"$OUT/bench_bf16.err" \
    | tee "$OUT/bench_bf16.txt" | tail -30
timeout 90 $PY -m softmax_ce_gpu.bench.cli --device $DEVICE --ops cross_entropy --dtypes fp32 \
    --shapes $SHAPES_FP32 --providers $PROVIDERS --out "$OUT/bench_fp32" 2>"$OUT/bench_fp32.err" \
    | tee "$OUT/bench_fp32.txt" | tail -8

step "linear_cross_entropy benchmark (N x V with H = 4096)"
if [ "${DRYRUN:-0}" = 1 ]; then LSHAPES=8x300; else LSHAPES=8192x128256; fi
timeout 180 $PY -m softmax_ce_gpu.bench.cli --device $DEVICE --ops linear_cross_entropy \
    --dtypes bf16 --shapes $LSHAPES --providers softmax_ce_gpu,torch_lce,torch,liger,cce \
    --out "$OUT/bench_linear" 2>"$OUT/bench_linear.err" | tee "$OUT/bench_linear.txt" | tail -12
fi
step "done"
