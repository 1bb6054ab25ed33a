#!/usr/bin/env bash
# The GPU session's one batch (device tool, repo root, `.whl` carried; `.base` carried: the
# package as it was before the change, for a before/after in the same run).
# GPU tests, then load and push benchmarks of this tree and of `.base` on one checkpoint.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
NEW=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
PYTHONPATH=$NEW python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/gpu.txt"
PYTHONPATH=$NEW timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_cuda.py \
    tests/test_load_cuda.py tests/test_sync_cuda.py 2>&1 | tail -15 | tee "$OUT/pytest.txt"
# 16 GB Llama-8B-shaped checkpoint, 1 GB shards written by 16 threads.
PYTHONPATH=$NEW python3 -c "from loadfsm.testing import write_checkpoint; write_checkpoint('llama-8b', '/tmp/ck', max_shard_bytes=1 << 30)"
for side in new base; do
  [ $side = new ] && R=$PWD || R=$PWD/.base
  P=/tmp/site:$R
  if [ -f "$R/loadfsm/bench.py" ]; then      # a tree from before the benchmarks left the package
    LOAD="-m loadfsm bench"; SYNC="-m loadfsm.bench_sync"
  else
    LOAD=$PWD/benchmarks/load_bench.py; SYNC=$PWD/benchmarks/sync_bench.py
  fi
  # from /tmp: `python -m` puts the current folder first on sys.path, ahead of PYTHONPATH
  (cd /tmp && PYTHONPATH=$P timeout 150 python3 $LOAD --model llama-8b --device cuda --repeat 3 --dir /tmp/ck --json) \
      | sed "s/^{/{\"side\": \"$side\", /" | tee -a "$OUT/bench_load.jsonl"
  (cd /tmp && PYTHONPATH=$P timeout 90 python3 $SYNC --model llama-8b-4l --device cuda --repeat 5 --json) \
      | sed "s/^{/{\"side\": \"$side\", /" | tee -a "$OUT/bench_sync.jsonl"
done
