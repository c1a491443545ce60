#!/usr/bin/env bash
# The whole workflow on the embedded synthetic dataset, as TLT's steps:
# prepare data -> check the spec -> train -> evaluate -> infer.
# Re-running resumes an unfinished training and skips the steps whose outputs are up to date.
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")"
python3 -m pip install -q -e .
mrcnn="python3 -m mrcnn_helpers"
spec=specs/demo_synthetic.txt
results=${RESULTS_DIR:-results/demo}
data=data/synthetic

# Newer than every file after it (and existing)?
up_to_date() { local out=$1; shift; [ -e "$out" ] && for f in "$@"; do [ "$out" -nt "$f" ] || return 1; done; }

if ! up_to_date "$data/annotations/instances_val.json" "$0"; then
    $mrcnn data synthetic "$data" --style simple --image-size 128 128 --num-train 400 --num-val 50
fi
$mrcnn spec validate $spec
$mrcnn train -e $spec -r "$results"          # evaluates the validation split at its last step
model=$(ls -t "$results"/model.step-*.pth | head -n 1)
if ! up_to_date "$results/val_metrics.json" "$model" "$spec"; then
    $mrcnn evaluate -e $spec -m "$results" --json "$results/val_metrics.json"
fi
if ! up_to_date "$results/infer/results.json" "$model" "$spec"; then
    $mrcnn infer -e $spec -m "$results" -i "$data/val" -o "$results/infer" -t 0.5 \
        --include-mask --json "$results/infer/results.json"
fi
echo "Metrics: $results/val_metrics.json; curves: $results/results.png; PR curves, confusion" \
     "matrix and predictions: $results/eval; annotated validation images: $results/infer"
