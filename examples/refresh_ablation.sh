#!/usr/bin/env bash
# Refresh-frequency ablation on Beauty: the ANN-GenNi run with the index refreshed every 1, 10, 100
# and 1000 steps (k-means retrained every 10th refresh), 30 epochs each.
set -euo pipefail
.venv/bin/annsample ablate --config configs/beauty-ann.yaml \
  --grid sampler.index.refresh_every=1,10,100,1000 \
  --set train.epochs=30 --set train.show_progress=false \
  --out runs/ablation-refresh
