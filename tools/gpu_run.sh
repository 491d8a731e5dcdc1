#!/usr/bin/env bash
# One check on a CUDA machine, in one call of under 8 minutes (no network needed):
#   1. build the package with its compiled extension, the CUDA part required
#      (SGOPD_FORCE_CUDA=1: the build fails rather than skip it);
#   2. the compiled kernels' tests on CUDA tensors (tests/test_cuda.py, test_compiled.py);
#   3. the compiled kernels' benchmark beside the Triton path, eager PyTorch and the
#      speed of light (benchmarks/bench_compiled.py --device cuda), recorded;
#   4. bench_loss.py with sgopd-cuda beside sgopd-triton and the competitors;
#   5. with FULL=1, the whole test suite (compiled Triton, not interpreted).
#
#   bash tools/gpu_run.sh OUTDIR [bench_loss.py arguments...]
#
# Writes OUTDIR/env.txt, build.log, tests_cuda.log, bench_compiled.log, bench.log
# (tests.log with FULL=1) and a copy of benchmarks/results/*.jsonl. Without
# benchmark arguments bench_loss.py runs --quick. Extra wheels (e.g. liger-kernel,
# trl) found in ./.whl are installed first (tools/fetch_wheels.sh downloads them).
# With SWEEP=1 it also runs benchmarks/sweep_blocks.py (launch settings of the
# Triton logits kernels).
set -uo pipefail
out=${1:?usage: tools/gpu_run.sh OUTDIR [bench args...]}
shift
bench_args=("$@")
[ ${#bench_args[@]} -eq 0 ] && bench_args=(--quick --providers sgopd-triton,sgopd-cuda,torch-eager,liger,speed-of-light)
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
start=$(date +%s)
left() { echo $(( ${1} - ($(date +%s) - start) )); }  # seconds left of a budget

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/sgopd_site .whl/*.whl && export PYTHONPATH=/tmp/sgopd_site${PYTHONPATH:+:$PYTHONPATH}
fi

# 1. build (the CUDA part for sm_90a, sm_80 and PTX; a few minutes at most)
SGOPD_FORCE_CUDA=1 timeout 300 python3 -m pip install -v \
    --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1
echo "build: exit $? in $(( $(date +%s) - start )) s (log: $out/build.log)"
tail -3 "$out/build.log"

{
    date -u +%FT%TZ
    git rev-parse HEAD 2>/dev/null
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.version.cuda)"
    python3 -c "from sgopd_kernels import compiled; print(compiled.build_info(), 'cuda available:', compiled.available('cuda'))"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

# 2. the compiled kernels' tests on the GPU
timeout "$(left 330)" python3 -m pytest -q -rs tests/test_cuda.py tests/test_compiled.py 2>&1 \
    | tee "$out/tests_cuda.log" | tail -15

# 3. the compiled kernels beside Triton, eager and the speed of light
timeout "$(left 400)" python3 benchmarks/bench_compiled.py --device cuda --N 8192 --V 151936,32000 \
    --dtype bf16 --cases logits-rkl,logits-gated,logits-fkl \
    --providers compiled,compiled-recompute,sgopd-triton,torch-eager,speed-of-light --record \
    2>&1 | tee "$out/bench_compiled.log" | tail -40

# 4. bench_loss.py (sgopd-cuda runs once the public losses dispatch to the compiled backend)
timeout "$(left 470)" python3 benchmarks/bench_loss.py "${bench_args[@]}" 2>&1 \
    | tee "$out/bench.log" | tail -40

# 5. optional: the whole suite, and the Triton launch sweep
if [ -n "${FULL:-}" ]; then
    python3 -m pytest -q -x tests 2>&1 | tee "$out/tests.log" | tail -15
fi
[ -n "${SWEEP:-}" ] && python3 benchmarks/sweep_blocks.py 2>&1 | tee "$out/sweep.log" | tail -12
cp benchmarks/results/*.jsonl "$out/" 2>/dev/null || true
echo "total $(( $(date +%s) - start )) s"
