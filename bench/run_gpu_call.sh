#!/usr/bin/env bash
# Every GPU figure in one device call, in the order of their worth, each stage under its own time limit so
# that one slow stage cannot starve the others, each result written to $RESULTS_DIR (the device machine's
# $OUT) as soon as it exists:
#   1. densenet121 at batch 128, 224x224, bf16, channels-last: excite, excite-fast, torchvision, timm
#      (train and inference; compiled candidates only with COMPILE=excite|all);
#   2. se_resnet50 the same, then inference at batch 256;
#   3. `excite train --recipe cifar-fast` on the JPEG CIFAR-10 training set (5,000 held out), EPOCHS;
#   4. tests/test_gpu.py.
# The CIFAR tarball travels as shared_data/cifar10-train-jpeg.tar.gz (see bench/README.md's runbook).
# Stage limits in seconds: T_DENSENET, T_SERESNET, T_RECIPE, T_TESTS. Only 8 files come back from a
# call, so only JSON is written: excite.bench.format_report makes the markdown reports from it afterwards.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
out=${RESULTS_DIR:-${OUT:-bench/results/gpu-call}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
device=${DEVICE:-cuda}
batch=${BATCH:-128}
img=${IMG:-224}
common=(--device "$device" --img-size "$img" --amp bf16 --channels-last --compile "${COMPILE:-none}"
        --warmup "${WARMUP:-10}" --iters "${ITERS:-20}" --repeats "${REPEATS:-3}")

stage() {  # stage NAME LIMIT COMMAND...: run with a time limit, say how it ended, never stop the script
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $name (limit ${limit}s) $(date -u +%FT%TZ)"
    timeout --signal=INT --kill-after=15 "$limit" "$@"
    echo "=== $name: exit $? after $((SECONDS - start))s"
}

"$py" --version; nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
"$py" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
"$py" -c "import timm; print('timm', timm.__version__)" || true

stage densenet121 "${T_DENSENET:-120}" "$py" -m excite.bench densenet121 --batch-size "$batch" "${common[@]}" \
    --json "$out/gpu-densenet121.json"
stage se_resnet50 "${T_SERESNET:-120}" bash -c '"$0" -m excite.bench se_resnet50 --batch-size "$1" "${@:3}" \
        --json "$2/gpu-se_resnet50.json" &&
    "$0" -m excite.bench se_resnet50 --mode infer --batch-size "$((2 * $1))" "${@:3}" \
        --json "$2/gpu-se_resnet50-infer256.json"' "$py" "$batch" "$out" "${common[@]}"

data=${DATA:-data/cifar10-jpeg/train}
if [ ! -d "$data" ] && [ -f shared_data/cifar10-train-jpeg.tar.gz ]; then
    mkdir -p data/cifar10-jpeg && tar xzf shared_data/cifar10-train-jpeg.tar.gz -C data/cifar10-jpeg
fi
stage recipe "${T_RECIPE:-200}" env PYTHON="$py" DATA="$data" EPOCHS="${EPOCHS:-10}" RESULTS="$out/recipe-cifar-fast" \
    DEVICE="$device" bash bench/run_recipe_gpu.sh ${RECIPE_ARGS:-}
if [ ! -f "$out/recipe-cifar-fast.json" ] && compgen -G "runs/recipe-cifar-fast-e*/metrics.jsonl" >/dev/null; then
    "$py" -m bench.summarise_run runs/recipe-cifar-fast-e* --json "$out/recipe-cifar-fast.json"  # a run cut short
fi

stage tests "${T_TESTS:-150}" "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py --junitxml="$out/test_gpu.xml"
nvidia-smi --query-gpu=name,memory.used,temperature.gpu,clocks.sm --format=csv 2>/dev/null || true
