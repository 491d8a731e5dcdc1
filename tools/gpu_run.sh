#!/usr/bin/env bash
# One full check on a CUDA machine: install (no network needed), run the test
# suite on CUDA tensors (compiled Triton, not interpreted), then the benchmark.
#
#   bash tools/gpu_run.sh OUTDIR [bench_loss.py arguments...]
#
# Writes OUTDIR/env.txt, OUTDIR/tests.log, OUTDIR/bench.log and a copy of the
# benchmark's results/*.jsonl. Without benchmark arguments it runs --quick.
# Extra wheels (e.g. liger-kernel, trl) found in ./.whl are installed first
# (tools/fetch_wheels.sh downloads them). With SWEEP=1 it also runs
# benchmarks/sweep_blocks.py (launch settings of the logits kernels).
set -uo pipefail
out=${1:?usage: tools/gpu_run.sh OUTDIR [bench args...]}
shift
bench_args=("$@")
[ ${#bench_args[@]} -eq 0 ] && bench_args=(--quick)
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/sgopd_site .whl/*.whl && export PYTHONPATH=/tmp/sgopd_site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3

{
    date -u +%FT%TZ
    git rev-parse HEAD 2>/dev/null
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.version.cuda)"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

python3 -m pytest -q -x tests 2>&1 | tee "$out/tests.log" | tail -15
python3 benchmarks/bench_loss.py "${bench_args[@]}" 2>&1 | tee "$out/bench.log" | tail -40
[ -n "${SWEEP:-}" ] && python3 benchmarks/sweep_blocks.py 2>&1 | tee "$out/sweep.log" | tail -12
cp benchmarks/results/*.jsonl "$out/" 2>/dev/null || true
