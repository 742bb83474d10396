#!/usr/bin/env bash
# The print-size measurements of bench/RESULTS.md ("large cpu"), one after another on this machine.
# Usage: bash bench/large.sh   (about an hour on the 2-core CPU; rows in bench/out/large.jsonl)
set -euo pipefail
cd "$(dirname "$0")/.."
py() { python bench/large.py "$@"; }
py step --size 1024 --tile 512
py run d512 --size 512
py run u1024 --size 1024
py run t1024 --size 1024 --max-memory 2GB
py compare bench/out/large_u1024.png bench/out/large_t1024.png
py run u2048 --size 2048
py run t2048 --size 2048 --max-memory 2GB
py run t4096 --size 4096 --max-memory 8GB --set refine_steps=3,1,1
py table
