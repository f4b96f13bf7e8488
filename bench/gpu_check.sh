#!/usr/bin/env bash
# The checks that need a GPU, as one script for a lent GPU machine (the device tool allows 15
# minutes of device time in all, start included; the steps below are capped at about 8):
#   1. the CUDA tests, which CI skips (tests/test_cuda.py, and the CUDA test of test_crf_torch.py)
#   2. DeepLab v2 ResNet-101 on CUDA: inference at 513 (fp32, bf16, channels_last, MSC) and
#      one training iteration (fp32, bf16)                      -> inference_cuda.json
#   3. the torch dense CRF on CUDA (float32 and float16 lattice) against pydensecrf on that
#      machine's CPU, with label agreement                      -> crf_torch_cuda.json
# pydensecrf is not in the device image and PyPI has only its source (pydensecrf2-1.1.tar.gz):
# carry that file in .whl/ (`pip download --no-deps -d .whl pydensecrf2`); it is built there
# with the image's Cython and compiler. Without it step 3 stops with its message.
# Usage, on the device machine from the repository root:  bash bench/gpu_check.sh
# Results go to $OUT (the device tool's folder), else bench/results/gpu/.
set -u -o pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ls .whl/* >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade \
        --target /tmp/site .whl/* && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    | tee -a "$OUT/gpu.txt"

echo "== 1. CUDA tests"
timeout 150 $PY -m pytest -q -rs tests/test_cuda.py "tests/test_crf_torch.py::test_cuda_matches_cpu" \
    2>&1 | tee "$OUT/cuda_tests.txt" | tail -15

echo "== 2. ResNet-101 on CUDA"
timeout 200 $PY bench/bench_inference.py --device cuda --reps 5 --out "$OUT/inference_cuda.json" \
    2>&1 | tee "$OUT/inference_cuda.txt" | tail -25

echo "== 3. dense CRF on CUDA"
timeout 150 $PY bench/bench_crf_torch.py --device cuda --threads 1 --images 4 --repeats 3 \
    --out "$OUT/crf_torch_cuda.json" 2>&1 | tee "$OUT/crf_torch_cuda.txt" | tail -25
