#!/usr/bin/env bash
# Every run behind a sampler table in docs/results.md, one seed per call:
#   DATASET=beauty SEED=1 bash examples/results_table.sh
#   DATASET=sports SEED=0 bash examples/results_table.sh
# Each run writes runs/<config>-s<seed>/; `annsample report runs/<dataset>*-s*` prints the table.
set -euo pipefail
DATASET=${DATASET:-beauty}
SEED=${SEED:-0}
CONFIGS=${CONFIGS:-"$DATASET $DATASET-popularity-bce $DATASET-dns-bce $DATASET-pool-bce $DATASET-exact $DATASET-ann $DATASET-ann-ssm $DATASET-full-ce"}
for config in $CONFIGS; do
  .venv/bin/annsample train --config "configs/$config.yaml" --set seed="$SEED" \
    --set train.num_threads=1 --set train.show_progress=false --out "runs/$config-s$SEED"
done
