#!/usr/bin/env bash
# Download the competitors' wheels (and what they need beyond a stock CUDA
# PyTorch image) into ./.whl for a GPU machine without network; tools/gpu_run.sh
# installs them from there.
#
#   bash tools/fetch_wheels.sh [python-version]     # default 3.12
#
# LigerJSD / LigerKLDIVLoss / LigerFusedLinearJSD come from liger-kernel;
# trl.kernels.chunked_divergence imports trl's trainer utilities, which import
# datasets (and datasets dill and multiprocess). transformers, accelerate,
# pandas and pyarrow are expected on the machine already.
set -euo pipefail
py=${1:-3.12}
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    liger-kernel==0.8.5 trl==1.16.0 datasets dill multiprocess
ls -la .whl
du -sh .whl
