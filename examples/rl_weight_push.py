"""RL weight push: a bf16 trainer updates an FP8 inference engine after every step.

Two processes on one machine. Rank 0 (trainer) holds the bf16 reference model and
takes optimizer steps; after each, its hook broadcasts ``model.named_parameters()``
in buckets. Rank 1 (engine) holds the model loaded in FP8 by loadfsm and applies each
push in place through ``WeightSync``. After every push the engine checks itself
against a fresh FP8 load of the trainer's current weights (which the trainer saved to
a shared temporary directory for this demo) and prints the verdict.

    python examples/rl_weight_push.py                 # gloo on CPU
    python examples/rl_weight_push.py --backend nccl  # two GPUs (the default when 2 exist)
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import loadfsm
from loadfsm.testing import build_model, load_reference_model, reference_state_dict
from loadfsm.reload.routes import checkpoint_tensors
from loadfsm import WeightReceiver, WeightSender

# NVLink multicast can take a shared host's GPUs out of service: keep it off.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")


def trainer(args, device, tmp):
    model = load_reference_model(args.config, seed=0, device=device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    hook = WeightSender(bucket_bytes=args.bucket_mb << 20)
    for step in range(args.steps):
        ids = torch.randint(0, model.config.vocab_size, (4, 32), device=device)
        loss = model(ids).float().logsumexp(-1).mean()      # any loss will do
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        torch.save({n: t.cpu().clone() for n, t in checkpoint_tensors(model)},
                   f"{tmp}/step{step}.pt")
        sent = hook(model.named_parameters())
        print(f"[trainer] step {step}: loss {loss.item():.4f}, pushed {sent / 2**20:.1f} MiB")


def engine(args, device, tmp):
    model = build_model(args.config)
    report = loadfsm.load(model, reference_state_dict(args.config, seed=0).items(),
                          quant=args.quant, device=device)
    receiver = WeightReceiver(loadfsm.WeightSync(model))
    addresses = {n: t.data_ptr() for n, t in model.state_dict().items()}
    for step in range(args.steps):
        pushed = receiver.receive()
        fresh = build_model(args.config)
        loadfsm.load(fresh, torch.load(f"{tmp}/step{step}.pt").items(), quant=args.quant,
                     device=device)
        expected = fresh.state_dict()
        state = model.state_dict()
        same = all(torch.equal(t.reshape(-1).view(torch.uint8),
                               expected[n].reshape(-1).view(torch.uint8))
                   for n, t in state.items())
        kept = all(t.data_ptr() == addresses[n] for n, t in state.items())
        print(f"[engine]  step {step}: {pushed.layers_updated} layers, "
              f"{pushed.bytes_received / 2**20:.1f} MiB in {pushed.seconds * 1e3:.0f} ms; "
              f"matches a fresh {args.quant} load: {same}; data_ptrs unchanged: {kept}",
              flush=True)
        if not (same and kept):
            raise SystemExit("engine diverged from the trainer")


def worker(rank, args, tmp):
    nccl = args.backend == "nccl"
    if nccl:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if nccl else torch.device("cpu")
    dist.init_process_group(args.backend, init_method=f"file://{tmp}/store", rank=rank,
                            world_size=2)
    try:
        (trainer if rank == 0 else engine)(args, device, tmp)
        dist.barrier()          # the trainer must not tear the group down under the engine
    finally:
        dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--quant", default="fp8")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=10.0)
    parser.add_argument("--bucket-mb", type=int, default=8)
    parser.add_argument("--backend", choices=["gloo", "nccl"],
                        default="nccl" if torch.cuda.device_count() >= 2 else "gloo")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args, tmp), nprocs=2, join=True)


if __name__ == "__main__":
    main()
