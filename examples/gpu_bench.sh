#!/usr/bin/env bash
# The GPU path in one call of a few minutes: the CUDA tests, torch-only search / exact-sampler
# timings at 1M and 10M items, and `annsample bench step` at 1M and 10M for uniform, exact and ann
# (torch IVF, and FAISS GPU if it loads). Everything lands in $OUT (at most 6 files):
#   log.txt                      all output, environment first
#   bench_ivf_cuda.json          annsample bench ivf --device cuda (torch only, no faiss)
#   step_1M.json, step_10M.json  annsample bench step, ann on the torch_ivf backend
#   step_*_faiss_gpu.json        the same ann step on FAISS GPU, only if faiss sees a GPU
#
# Usage, from the repository root of any CUDA machine with torch (no install needed: the
# repository goes on PYTHONPATH; click, PyYAML, tqdm, scipy, pytest and hypothesis are needed):
#   OUT=/tmp/gpu_bench bash examples/gpu_bench.sh
# On the lent H200 (torch 2.11 + CUDA 13, no faiss, no registry), as one device call:
#   run(command="bash examples/gpu_bench.sh", timeout_s=560)
# Wheels carried in .whl/ (e.g. a cp312 faiss-cpu) are installed to /tmp/site first.
# Each stage has its own timeout, so a slow stage cannot take the later ones down with it; the
# stages write their JSON as they go.
set -u -o pipefail
OUT=${OUT:-gpu_bench_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }
ANNSAMPLE=("$PY" -c 'import sys; from cli.main import main; sys.argv[0] = "annsample"; main()')

main() {
if compgen -G ".whl/*.whl" >/dev/null; then
  stamp "installing carried wheels: $(ls .whl)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

stamp "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
"$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0))
try:
    import faiss
    print("faiss", faiss.__version__, "gpus", faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0)
except ImportError as error:
    print("faiss not importable:", error)
EOF
FAISS_GPU=0
if "$PY" -c 'import faiss, sys; sys.exit(0 if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 else 1)' 2>/dev/null; then
  FAISS_GPU=1
fi
echo "faiss GPU usable: $FAISS_GPU"

stamp "1/3 CUDA tests (pytest -m gpu)"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs \
  tests/test_index_torch_ivf.py tests/test_exact_gumbel.py
echo "pytest exit status: $?"

stamp "2/3 torch-only timings: exact top-k vs torch_ivf search, exact GenNi samplers"
timeout 200 "$PY" -m annsample.cli bench ivf --device cuda --n 1000000 --n 10000000 \
  --queries 256 --queries 12800 --nprobe 8 --nprobe 16 --nprobe 32 --k 200 --repeats 3 \
  --threads 16 --samplers \
  --json "$OUT/bench_ivf_cuda.json"
echo "bench_ivf exit status: $?"

stamp "3/3 annsample bench step (uniform, exact, ann on torch_ivf; FAISS GPU if usable)"
if "$PY" -c 'import annsample.bench.step' 2>/dev/null; then
  for size in 1M 10M; do
    limit=$([ "$size" = 1M ] && echo 100 || echo 150)
    timeout "$limit" "${ANNSAMPLE[@]}" bench step --catalog-size "$size" \
      --sampler uniform --sampler exact --sampler ann --device cuda \
      --steps 10 --warmup-steps 50 --max-seconds 15 --probe-queries 8 \
      --set sampler.index.backend=torch_ivf --json "$OUT/step_$size.json"
    echo "bench step $size exit status: $?"
    if [ "$FAISS_GPU" = 1 ]; then
      timeout 90 "${ANNSAMPLE[@]}" bench step --catalog-size "$size" --sampler ann \
        --device cuda --steps 10 --warmup-steps 50 --max-seconds 15 --probe-queries 8 \
        --set sampler.index.backend=faiss-gpu --json "$OUT/step_${size}_faiss_gpu.json"
      echo "bench step $size faiss-gpu exit status: $?"
    fi
  done
else
  echo "skipped: this checkout has no annsample.bench.step (the 'bench step' command)"
fi
stamp "done"
}

# A pipeline rather than `exec > >(tee ...)`, so the log is complete when the script returns.
main 2>&1 | tee "$OUT/log.txt"
