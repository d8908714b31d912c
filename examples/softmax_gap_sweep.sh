#!/usr/bin/env bash
# How close the logQ-corrected sampled softmax with ANN negatives sits to the full softmax, for a
# few candidate / tail / probe settings, measured on one trained run (no training). Prints a
# markdown table; each setting is "K,M,nprobe" (candidates, tail items, IVF lists probed).
#   RUN=runs/beauty-ann-ssm-s0 bash examples/softmax_gap_sweep.sh
set -euo pipefail
RUN=${RUN:-runs/beauty-ann-ssm-s0}
SETTINGS=${SETTINGS:-"200,0,32 200,256,32 200,1024,32 1000,256,32 1000,1024,32 200,256,64 200,256,128"}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
row='import json, sys; r = json.load(open(sys.argv[1]))[0]; print(sys.argv[2].format(**r))'
echo "| candidates K | tail items M | nprobe | TV to exact GenNi | hardness | softmax gap (nats, k = 128) |"
echo "|---:|---:|---:|---:|---:|---:|"
.venv/bin/annsample bench samplers "$RUN" --sampler exact --repeats 1 --json "$tmp/r.json" >/dev/null 2>&1
.venv/bin/python -c "$row" "$tmp/r.json" \
  "| exact GenNi | – | – | {tv_to_exact:.4f} | {hardness:.3f} | {softmax_gap:.4f} |"
for setting in $SETTINGS; do
  IFS=, read -r k m nprobe <<< "$setting"
  .venv/bin/annsample bench samplers "$RUN" --sampler ann --repeats 1 --set sampler.candidates="$k" \
    --set sampler.tail_samples="$m" --set sampler.index.nprobe="$nprobe" --json "$tmp/r.json" >/dev/null 2>&1
  .venv/bin/python -c "$row" "$tmp/r.json" \
    "| {candidates} | {tail_samples} | {nprobe} | {tv_to_exact:.4f} | {hardness:.3f} | {softmax_gap:.4f} |"
done
