#!/usr/bin/env bash
# The print-size measurements of bench/RESULTS.md ("large cpu"), one after another on this machine.
# Usage: bash bench/large.sh   (about an hour on the 2-core CPU; rows in bench/out/large.jsonl)
set -euo pipefail
cd "$(dirname "$0")/.."
py() { python bench/large.py "$@"; }
py step --size 1024 --tile 512
py run u1024 --size 1024
py run t1024 --size 1024 --max-memory 2GB
py compare bench/out/large_u1024.png bench/out/large_t1024.png
py run u2048 --size 2048
# a quarter of the untiled run's measured peak RSS
quarter=$(python -c "import json; r=[json.loads(l) for l in open('bench/out/large.jsonl') if '\"u2048\"' in l][-1]; print(f\"{r['peak_rss_gb'] / 4:.2f}GB\")")
py run t2048 --size 2048 --max-memory "$quarter"
py run p2048 --size 2048 --set stroke_scale=pixels
py run t4096 --size 4096 --max-memory 8GB --set refine_steps=3,1,1
py table
