#!/usr/bin/env bash
# The small-image recipe on the JPEG CIFAR-10 training set (50,000 images; 5,000 held out, stratified,
# seed 0): `excite train --recipe cifar-fast` once per epoch budget in EPOCHS (default "10"), then one
# summary of accuracy against training time for all of them (bench/summarise_run.py).
# DATA is the ImageFolder root (default data/cifar10-jpeg/train, from
# `mkdir -p data/cifar10-jpeg && tar xzf cifar10-train-jpeg.tar.gz -C data/cifar10-jpeg`).
# DEVICE picks the device (default cuda). Extra arguments go to every `excite train` (e.g. `--model se_resnet20_cifar`).
# Run directories go under RUNS (default runs/, git-ignored); the summary, with every epoch's accuracy and
# time, to RESULTS.json. Example: EPOCHS="10 16 24" bench/run_recipe_gpu.sh (later runs reuse compiled kernels)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${DATA:-data/cifar10-jpeg/train}
out=${RESULTS:-bench/results/recipe-cifar-fast-$(date +%F)}
runs=()
for epochs in ${EPOCHS:-10}; do
    run="${RUNS:-runs}/recipe-cifar-fast-e$epochs"
    rm -rf "$run"
    "${PYTHON:-python}" -m excite.cli train --recipe cifar-fast --data "$data" --val-split 0.1 --device "${DEVICE:-cuda}" \
        --epochs "$epochs" --out "$run" "$@"
    runs+=("$run")
done
"${PYTHON:-python}" -m bench.summarise_run "${runs[@]}" --json "$out.json"
