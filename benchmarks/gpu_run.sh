#!/usr/bin/env bash
# The GPU session's one batch (device tool, repo root; `.whl` carried: transitions and
# structlog wheels; `.base` carried: the package before the change, for a before/after in
# the same run). GPU tests, then every benchmark: this tree against `.base` where both apply.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
F=$PWD; B=$PWD/.base; O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/pq
new() { env PYTHONPATH=/tmp/site:$F "$@"; }
new timeout 300 python3 -m pytest -q -p no:cacheprovider -p no:warnings tests/test_fp8_cuda.py \
    tests/test_load_cuda.py tests/test_sync_cuda.py tests/test_int8_cuda.py \
    tests/test_prequantized_cuda.py tests/test_finiteness_memory.py \
    tests/test_fp8_block_forward_cuda.py tests/test_warmup.py tests/test_owned_arrivals.py \
    tests/test_borrowed_push.py tests/test_commit_writes.py tests/test_hf.py 2>&1 | tail -5 \
    | tee "$O/tests.txt"
new timeout 150 python3 -m pytest -q -p no:cacheprovider -p no:warnings -k cuda \
    tests/test_colocated.py tests/test_colocated_direct.py tests/test_weight_versions.py \
    tests/test_delta_push.py 2>&1 | tail -3 | tee -a "$O/tests.txt"
# From /tmp: `python -m` puts the current folder first on sys.path, ahead of PYTHONPATH.
cd /tmp
new python3 -c "from loadfsm.testing import write_checkpoint; write_checkpoint('llama-8b', '/tmp/ck', max_shard_bytes=1 << 30)"
for side in new base; do
  [ $side = new ] && R=$F || R=$B
  if [ -f "$R/loadfsm/bench.py" ]; then LOAD="-m loadfsm bench"; SYNC="-m loadfsm.bench_sync"
  else LOAD=$F/benchmarks/load_bench.py; SYNC=$F/benchmarks/sync_bench.py; fi
  env PYTHONPATH=/tmp/site:$R timeout 150 python3 $LOAD --model llama-8b --device cuda --repeat 3 \
      --dir /tmp/ck --json | sed "s/^{/{\"side\": \"$side\", /" | tee -a "$O/load.jsonl"
  env PYTHONPATH=/tmp/site:$R timeout 90 python3 $SYNC --model llama-8b-4l --device cuda --repeat 5 \
      --json | sed "s/^{/{\"side\": \"$side\", /" | tee -a "$O/sync.jsonl"
done
new timeout 60 python3 $F/benchmarks/read_paths.py --dir /tmp/ck --repeat 2 | tee "$O/read_paths.txt"
# The load's rows against their anchors; --cold drops the page cache (root on the H200).
new timeout 200 python3 $F/benchmarks/load_anchors.py --dir /tmp/ck --device cuda --repeat 2 \
    --cold | tee "$O/anchors.txt"
new timeout 60 python3 $F/benchmarks/push_profile.py | tee "$O/push_profile.txt"
new timeout 60 python3 $F/benchmarks/forward_host.py | tee "$O/forward_host.txt"
new timeout 90 python3 $F/benchmarks/forward_bench.py | tee "$O/forward.txt"
new timeout 150 python3 $F/benchmarks/prequant_bench.py --model llama-8b-4l --device cuda \
    --granularity block --repeat 3 --dir /tmp/pq --json | tail -1 | tee "$O/prequant.jsonl"
new timeout 120 python3 $F/benchmarks/colocated_bench.py --model llama-8b-4l --device cuda \
    --repeat 3 --bucket-only --direct-min-mb 256,16 --json | tail -1 | tee "$O/colocated.jsonl"
new timeout 100 python3 $F/benchmarks/push_names_bench.py --device cuda --repeat 3 --json | tail -1 \
    | tee "$O/push_names.jsonl"
for mode in layers tiles; do
  new timeout 300 python3 $F/benchmarks/delta_bench.py --model llama-8b-4l --mode $mode \
      --device cuda --repeat 5 --json | tail -1 | tee -a "$O/delta.jsonl"
done
# transformers >= 5.24 carried as a wheel (the image has 5.17); accelerate is in the image.
new timeout 200 python3 $F/benchmarks/first_load.py --dir /tmp/ck --repeat 2 --json \
    | tee "$O/first_load.txt"
new timeout 60 python3 $F/benchmarks/int8_bench.py --device cuda --json | tail -1 | tee "$O/int8.jsonl"
