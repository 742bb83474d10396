#!/usr/bin/env bash
# Issue 23's measurements (bench/RESULTS.md "prints"), one after another on an otherwise idle machine:
# the memory ladder rung by rung, then the default schedule at 2048 px untiled, within 2 GB and within a quarter of
# the untiled run's peak, each with the planner's predicted time and both print yardsticks (the 512 px run of the
# pair is the preview). About 75 minutes on the 2-core CPU; rows in bench/out/{ladder,large}.jsonl.
# Usage: bash bench/prints.sh [QUARTER]   (QUARTER: the budget for the third run, e.g. 1.6GB; default from the
#        untiled run's peak RSS)
set -euo pipefail
cd "$(dirname "$0")/.."
python bench/ladder.py --size 1024 --tile 512 --cuts pool3 pool2 --steps 2
python bench/ladder.py --size 2048 --tile 704 --cuts pool2 --steps 2
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
