#!/usr/bin/env bash
# The print-size measurements of bench/RESULTS.md ("large cpu"), one after another on this machine.
# Usage: bash bench/large.sh   (about 90 minutes on the 2-core CPU; rows in bench/out/large.jsonl)
set -euo pipefail
cd "$(dirname "$0")/.."
py() { python bench/large.py "$@"; }
py step --size 1024 --tile 512
py run d512 --size 512
py run u1024 --size 1024
py run t1024 --size 1024 --max-memory 2GB
py compare bench/out/large_u1024.png bench/out/large_t1024.png
py run u2048 --size 2048
py run f2048 --size 2048 --max-memory 4GB
# a short schedule: 60 steps to 512 px, then 2, 1 and 1 at 1024, 2048 and 4096 px
py run t4096 --size 4096 --max-memory 8GB --set steps=60 refine_steps=2,1,1
py table --record
