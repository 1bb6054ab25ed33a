"""Engine hook: an engine's own ``load_weights`` loads FP8 layer by layer, optionally
tensor-parallel.

The model (``EngineLlamaForCausalLM``) is written the way vLLM writes models: fused
``qkv_proj`` / ``gate_up_proj`` / MoE experts whose parameters carry ``weight_loader``s,
and a ``load_weights`` that maps checkpoint names itself. It knows nothing of loadfsm.
Inside ``with loadfsm.LoadSession(...)`` each loader call becomes an arrival: a layer
materializes at its first call, quantizes to FP8 at its last, and the bf16 copy is
freed at once. With ``--tp 2`` two processes each load (and read from disk) only their
shard of every column/row-parallel weight.

    python examples/engine_hook.py                    # one process, CPU (or one GPU)
    python examples/engine_hook.py --tp 2             # two ranks: gloo on CPU, NCCL on GPUs
    python examples/engine_hook.py --config tiny-moe
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import loadfsm
from loadfsm.testing import write_checkpoint
from loadfsm.testing.engine_llama import EngineLlamaForCausalLM
from loadfsm.sources.safetensors_slices import safetensors_weights

# NVLink multicast can take a shared host's GPUs out of service: keep it off.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")


def load_and_run(args, ckpt: str, device: torch.device, rank: int) -> None:
    with torch.device("meta"):
        model = EngineLlamaForCausalLM(args.config, dtype=torch.bfloat16)
    weights = safetensors_weights(ckpt)          # lazy: each rank reads only its slices
    with loadfsm.LoadSession(model, quant=args.quant, device=device) as session:
        model.load_weights(weights)              # the engine's own code
    report = session.report
    ids = torch.arange(16, device=device).unsqueeze(0)
    with torch.no_grad():
        logits = model(ids)
    if rank == 0 or args.tp > 1:
        print(f"[rank {rank}] {report.states['FINALIZED']} layers FINALIZED, "
              f"read {weights.bytes_read / 2**20:.1f} MiB, final {report.final_bytes / 2**20:.1f}"
              f" MiB, peak {report.peak_bytes / 2**20:.1f} MiB; logits {tuple(logits.shape)}, "
              f"next token {int(logits[0, -1].argmax())}", flush=True)


def worker(rank: int, args, ckpt: str, store: str) -> None:
    cuda = torch.cuda.device_count() >= args.tp
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}",
                            rank=rank, world_size=args.tp)
    try:
        load_and_run(args, ckpt, device, rank)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="a loadfsm.testing config name")
    parser.add_argument("--quant", default="fp8", help="fp8, fp8-channel, fp8-block or none")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(write_checkpoint(args.config, os.path.join(tmp, "ckpt")))
        if args.tp == 1:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            load_and_run(args, ckpt, device, 0)
        else:
            mp.spawn(worker, args=(args, ckpt, os.path.join(tmp, "store")), nprocs=args.tp)


if __name__ == "__main__":
    main()
