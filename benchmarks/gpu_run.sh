#!/usr/bin/env bash
# The GPU session's one batch (run through the device tool from the repo root, with the
# .whl folder carried): GPU tests, the demo on CUDA, the load and push benchmarks.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_fp8_cuda.py tests/test_load_cuda.py \
    $(ls tests/test_sync_cuda.py 2>/dev/null) 2>&1 | tail -25 | tee "$OUT/pytest.txt"
python3 -m loadfsm demo --json 2>/dev/null | tee "$OUT/demo.json"
python3 -m loadfsm bench --model llama-8b --device cuda --repeat 3 --dir /tmp/ckpt8b32 --json \
    | tee "$OUT/bench_load.json"
python3 -m loadfsm.bench_sync --model llama-8b-4l --device cuda --json \
    $( [ "$(nvidia-smi -L | wc -l)" -ge 2 ] && echo --transport nccl ) | tee "$OUT/bench_sync.json"
