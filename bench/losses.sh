#!/usr/bin/env bash
# The style-loss and colour measurements of bench/RESULTS.md ("style losses ...", "quality default 256 ..."),
# one after another, torch on one thread. Usage: bash bench/losses.sh (about 45 minutes on the 2-core CPU;
# PYTHON=... picks the interpreter). Images in bench/out/, grids in docs/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
PAIRS=(astronaut:starry_night coffee:shipwreck chelsea:brick chelsea:starry_night)
q() { "$PY" bench/quality.py --size 256 --threads 1 --pairs "${PAIRS[@]}" --json bench/out/losses.jsonl --record "$@"; }
"$PY" bench/losses.py --size 256 512 --steps 5 --threads 1 --record
q --tag gram
q --tag mean_cov --set "style_loss='mean_cov'"
q --tag sliced --set "style_loss='sliced'"
q --tag histogram --set "preserve_color='histogram'"
q --tag luminance --set "preserve_color='luminance'"
q --tag gram_avg --set "iterate_average=0.9"
q --tag mean_cov_avg --set "style_loss='mean_cov'" "iterate_average=0.9"
g() { "$PY" bench/grid.py --pairs "${PAIRS[@]}" --pattern "bench/out/default_{column}_256_{content}_{style}.png" "$@"; }
g -o docs/style_losses.jpg --columns gram mean_cov sliced
g -o docs/color_control.jpg --columns gram luminance histogram --labels "off" "luminance" "histogram"
# mean_cov stylizes harder at equal weights (content_ratio 0.31-0.59 vs gram's 0.30-0.41): again with twice the
# content weight, to compare the losses at a similar content_ratio
q --tag mean_cov_cw2 --set "style_loss='mean_cov'" "content_weight=2.0"
"$PY" bench/color.py --tags gram luminance histogram mean_cov sliced --record
