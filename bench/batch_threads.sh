#!/usr/bin/env bash
# Ray's overhead at equal threads: the 16 images of bench/batch.py (run it first: it makes /tmp/nsf-bench-batch/in),
# `nsf batch --engine ray` with 2 one-thread actors, then one process with torch's default threads and with one.
set -euo pipefail
S="$(cd "$(dirname "$0")/.." && pwd)/nsf/assets/starry_night.jpg"; R=${1:-/tmp/nsf-bench-batch}
C="--size 256 --steps ${STEPS:-4} --seed 0 --no-progress"
rm -rf "$R/r2" "$R/b2" "$R/b2t1"
run() { local name=$1; shift; local t0; t0=$(date +%s.%N); "$@" >/dev/null 2>&1
        echo "$name $(echo "$(date +%s.%N) - $t0" | bc) s, load $(cut -d' ' -f1 /proc/loadavg)"; }
run ray2 python -m nsf batch "$R/in" --style "$S" -o "$R/r2" --engine ray --workers 2 --cpus-per-worker 1 --batch-size 4 $C
run batch8 python -m nsf batch "$R/in" --style "$S" -o "$R/b2" --batch-size 8 $C
run batch8_1thread env OMP_NUM_THREADS=1 python -m nsf batch "$R/in" --style "$S" -o "$R/b2t1" --batch-size 8 $C
