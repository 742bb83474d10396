#!/usr/bin/env bash
# Issue 23's measurements (bench/RESULTS.md "prints"), one after another on an otherwise idle machine:
# the memory ladder rung by rung, then the default schedule at 2048 px untiled, within 2 GB and within a quarter of
# the untiled run's peak, each with the planner's predicted time and both print yardsticks (the 512 px run of the
# pair is the preview). About 110 minutes on the 2-core CPU; rows in bench/out/{ladder,large}.jsonl.
# Usage: bash bench/prints.sh [QUARTER]   (QUARTER: the budget for the third run, e.g. 1.6GB; default from the
#        untiled run's peak RSS)
set -euo pipefail
cd "$(dirname "$0")/.."
# the rungs: tile sizes (page faults above glibc's 32 MiB mmap limit), pass 1 narrowed to the style layers, the
# forward's share to each layer (nsf.plan.FORWARD_SHARE)
python bench/ladder.py --size 2048 --tile 416 352 480 704 --cuts --steps 2 --refined --wide-pass-one --no-mmap
python bench/ladder.py --size 1024 --tile 512 352 --cuts pool2 --steps 2 --no-mmap
python bench/ladder.py shares --size 512 --repeat 5
# steps at the last scale against the texture up close (nsf.config refine_steps): 4, 8, 12 steps at 2048 px
python bench/refine.py start --size 2048
for k in 4 8 12; do python bench/refine.py last "k$k" --size 2048 --print --set "refine_steps=20,$k"; done
py() { python bench/large.py run "$@"; }
py p512 --size 512
py p2048u --size 2048 --preview p512
py p2048m2 --size 2048 --max-memory 2GB --preview p512
quarter=${1:-$(python - <<'PY'
import json
rows = [json.loads(l) for l in open("bench/out/large.jsonl") if '"name": "p2048u"' in l]
print(f"{rows[-1]['peak_rss_gb'] / 4:.2f}GB")
PY
)}
py p2048q --size 2048 --max-memory "$quarter" --preview p512
py p1024 --size 1024 --preview p512
py p4096m8 --size 4096 --max-memory 8GB --preview p512
