#!/usr/bin/env bash
# The whole workflow on the embedded synthetic dataset, as TLT's steps:
# prepare data -> check the spec -> train -> evaluate -> infer. Re-running resumes or reports done.
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")"
python3 -m pip install -q -e .
mrcnn="python3 -m mrcnn_helpers"
spec=specs/demo_synthetic.txt
results=${RESULTS_DIR:-results/demo}

$mrcnn data synthetic data/synthetic
$mrcnn spec validate $spec
$mrcnn train -e $spec -r "$results"
$mrcnn evaluate -e $spec -m "$results" --json "$results/val_metrics.json"
$mrcnn infer -e $spec -m "$results" -i data/synthetic/val -o "$results/infer" -t 0.5 \
    --include-mask --json "$results/infer/results.json"
echo "Annotated validation images: $results/infer"
