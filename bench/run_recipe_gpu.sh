#!/usr/bin/env bash
# The small-image recipe on the JPEG CIFAR-10 training set (50,000 images; 5,000 held out, stratified,
# seed 0): `excite train --recipe cifar-fast`, then a summary of accuracy against training time.
# DATA is the ImageFolder root (default data/cifar10-jpeg/train, from
# `mkdir -p data/cifar10-jpeg && tar xzf cifar10-train-jpeg.tar.gz -C data/cifar10-jpeg`).
# Extra arguments go to `excite train` (e.g. `--epochs 40` for the 5-minute budget).
set -euo pipefail
cd "$(dirname "$0")/.."
data=${DATA:-data/cifar10-jpeg/train}
out=${OUT:-bench/results/recipe-cifar-fast-$(date +%F)}
rm -rf "$out-run"
"${PYTHON:-python}" -m excite.cli train --recipe cifar-fast --data "$data" --val-split 0.1 --device cuda \
    --out "$out-run" "$@"
"${PYTHON:-python}" bench/summarise_run.py "$out-run" --json "$out.json"
