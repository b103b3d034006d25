#!/usr/bin/env bash
# Everything graphopt measures on a lent GPU machine, in one call of the device tool
# (see /work/.library/device/README.md): kernel tests compiled on CUDA, the kernel
# benchmark (table configs, then autotuned), per-token quantization bandwidth, and the
# BERT-base int8 benchmark (autotuned launch configs). Results land in $OUT (copy them into
# bench/results/ afterwards).
#   bash bench/gpu_session.sh [step ...]     steps: tests kernels autotune quantize bert w4 (default: all)
#   TESTS="tests/kernels/test_x.py ..."      narrows the tests step
set -u
OUT=${OUT:-/tmp/graphopt-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ! python3 -c "import onnx_graphsurgeon" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
python3 -c "import graphopt.kernels" 2>/dev/null \
  || python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/tmp/install.log 2>&1 \
  || { cat /tmp/install.log; exit 1; }
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
steps=${*:-tests kernels autotune quantize bert w4}     # also: profile (where BERT-base GPU time goes)
for step in $steps; do
  echo "=== $step"
  case $step in
    tests) timeout 240 python3 -m pytest ${TESTS:-tests/kernels} -q -x -p no:cacheprovider 2>&1 | tee /tmp/tests.log | tail -15 ;;
    kernels) timeout 200 python3 -m bench.kernels --gpu-only --out "$OUT/kernels_gpu" 2>&1 | tail -40 ;;
    autotune) GRAPHOPT_AUTOTUNE=1 GRAPHOPT_CACHE_DIR="$OUT" GRAPHOPT_AUTOTUNE_LOG="$OUT/autotune_log.jsonl" \
                timeout 400 python3 -m bench.kernels --gpu-only \
                --out "$OUT/kernels_gpu_autotuned" 2>&1 | tail -30 ;;
    quantize) GRAPHOPT_CACHE_DIR=/tmp/graphopt-cache GRAPHOPT_AUTOTUNE_LOG="$OUT/autotune_log.jsonl" \
                timeout 200 python3 -m bench.quantize_gpu --out "$OUT/quantize_gpu" 2>&1 | tail -30 ;;
    bert) GRAPHOPT_AUTOTUNE=1 GRAPHOPT_CACHE_DIR=/tmp/graphopt-cache GRAPHOPT_AUTOTUNE_LOG="$OUT/autotune_log.jsonl" \
            timeout 400 python3 -m bench.int8_gpu --out "$OUT/int8_gpu" 2>&1 | tail -40 ;;
    w4) timeout 150 python3 -m bench.kernels_w4 --gpu --out "$OUT/kernels_w4_gpu.md" 2>&1 | tail -20 ;;
    profile) timeout 300 python3 -m bench.int8_gpu --profile --out "$OUT/int8_gpu" 2>&1 | tail -80 ;;
  esac
done
