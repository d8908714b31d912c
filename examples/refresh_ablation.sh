#!/usr/bin/env bash
# Refresh-frequency ablation on Beauty: the ANN-GenNi run with the index refreshed every 1, 10 and
# 100 steps, every epoch, and never (k-means retrained every 10th refresh), 3 seeds, 30 epochs each,
# two runs at a time. Rerun the same command to resume; `annsample ablate report` redraws the plots.
set -euo pipefail
.venv/bin/annsample ablate --config configs/beauty-ann.yaml \
  --grid sampler.index.refresh_every=1,10,100,epoch,never \
  --seeds 0,1,2 --jobs 2 \
  --set train.epochs=30 \
  --out runs/ablation-refresh
