#!/usr/bin/env bash
# The CPU suite: excite DenseNet-121, SE-ResNet-50 and ResNet-50 next to torchvision and timm, train and
# inference. Small settings (batch 8 at 128x128, 5 rounds of 4 steps) so that it takes minutes on two cores.
# Writes bench/results/cpu-DATE.json and .md; extra arguments go to `python -m excite.bench` (the last
# occurrence of an option wins). PYTHON picks the interpreter, RESULTS the result files' path without suffix.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${RESULTS:-bench/results/cpu-$(date +%F)}
"${PYTHON:-python}" -m excite.bench densenet121 se_resnet50 resnet50 --device cpu \
    --batch-size 8 --img-size 128 --warmup 2 --iters 4 --repeats 5 \
    --json "$out.json" --markdown "$out.md" "$@"
