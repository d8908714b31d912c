#!/usr/bin/env bash
# Every run behind the Beauty table in docs/results.md (one seed per call: SEED=1 bash examples/beauty_table.sh).
# Each run writes runs/<config>-s<seed>/; `annsample report runs/*-s*` prints the table.
set -euo pipefail
SEED=${SEED:-0}
CONFIGS=${CONFIGS:-"beauty beauty-popularity-bce beauty-dns-bce beauty-pool-bce beauty-exact beauty-ann beauty-ann-ssm beauty-full-ce"}
for config in $CONFIGS; do
  .venv/bin/annsample train --config "configs/$config.yaml" --set seed="$SEED" \
    --set train.num_threads=1 --set train.show_progress=false --out "runs/$config-s$SEED"
done
