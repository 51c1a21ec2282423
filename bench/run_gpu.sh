#!/usr/bin/env bash
# The GPU suite: excite DenseNet-121, SE-ResNet-50 and ResNet-50 next to torchvision and timm at batch 128,
# 224x224, bf16 autocast, channels-last (train and inference), then SE-ResNet-50 inference at batch 256.
# excite is measured as built, as excite-fast and compiled (--compile excite); the peers as they come.
# Writes bench/results/gpu-DATE.json/.md and gpu-DATE-infer256.json/.md; extra arguments (e.g.
# `--compile all` to compile the peers too) go to both runs of `python -m excite.bench`, the last
# occurrence of an option winning. PYTHON picks the interpreter, RESULTS the result path prefix, MODELS
# the models of the first run (default "densenet121 se_resnet50 resnet50"; one per call keeps each call
# short). INFER256=0 skips the second run. Results are written after each model.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${RESULTS:-bench/results/gpu-$(date +%F)}
common=(--device cuda --img-size 224 --amp bf16 --channels-last --compile excite --warmup 10 --iters 20 --repeats 3)
# shellcheck disable=SC2086  # MODELS is a list of names
"${PYTHON:-python}" -m excite.bench ${MODELS:-densenet121 se_resnet50 resnet50} --batch-size 128 "${common[@]}" \
    --json "$out.json" --markdown "$out.md" "$@"
if [ "${INFER256:-1}" != 0 ]; then
    "${PYTHON:-python}" -m excite.bench se_resnet50 --mode infer --batch-size 256 "${common[@]}" \
        --json "$out-infer256.json" --markdown "$out-infer256.md" "$@"
fi
