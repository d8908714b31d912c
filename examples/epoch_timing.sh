#!/usr/bin/env bash
# Seconds per training epoch of every config of a dataset, one run at a time on an otherwise idle
# machine (one epoch each, evaluation excluded; torch's default thread count). Prints a markdown table.
#   DATASET=sports bash examples/epoch_timing.sh
set -euo pipefail
DATASET=${DATASET:-beauty}
OUT=${OUT:-runs/timing}
CONFIGS=${CONFIGS:-"$DATASET $DATASET-popularity-bce $DATASET-dns-bce $DATASET-pool-bce $DATASET-exact $DATASET-ann $DATASET-ann-ssm $DATASET-full-ce"}
echo "| config | s/epoch (1 epoch, alone) |"
echo "|---|---:|"
for config in $CONFIGS; do
  .venv/bin/annsample train --config "configs/$config.yaml" --set train.epochs=1 \
    --set train.show_progress=false --out "$OUT/$config" --overwrite >/dev/null 2>&1
  seconds=$(.venv/bin/python -c "import json,sys; print(f\"{json.load(open(sys.argv[1]))['seconds_per_epoch']:.1f}\")" "$OUT/$config/results.json")
  echo "| $config | $seconds |"
done
