#!/usr/bin/env bash
# The small-image path against the file loader on the CPU: one epoch of ResNet-20 on the JPEG CIFAR-10
# training set (45,000 train / 5,000 validation), once reading files (--no-cache-images) and once from the
# decoded in-memory cache (--cache-images), same seed. Writes bench/results/cache-cpu-DATE.json with both
# run summaries and the training throughput ratio; the run directories go under runs/. DATA as in
# run_recipe_gpu.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${DATA:-data/cifar10-jpeg/train}
out=${RESULTS:-bench/results/cache-cpu-$(date +%F)}
runs=runs/bench-cache-cpu
py=${PYTHON:-python}
for mode in no-cache-images cache-images; do
    rm -rf "$runs/$mode"
    "$py" -m excite.cli train --model resnet20_cifar --data "$data" --val-split 0.1 --epochs 1 --batch-size 128 \
        --lr 0.1 --device cpu --"$mode" --out "$runs/$mode"
done
"$py" -m bench.summarise_run "$runs/no-cache-images" "$runs/cache-images" --json "$out.json"
