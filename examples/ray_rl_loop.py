"""An RL loop with Ray actors: a bf16 trainer actor pushes into an FP8 engine actor.

The two actors share one machine (one GPU with ``--device cuda``: colocated, as verl and
slime run them). Every step the trainer takes an optimizer step and pushes its weights,
alternating two transports: the colocated one (shared buckets over a Unix socket: CUDA IPC
on a GPU, shared memory on CPU) and torch.distributed (gloo). After every push the engine
checks itself against a fresh FP8 load of the trainer's weights (bit for bit, and no
tensor moved) and the trainer's expected checksums against the engine's.

    python examples/ray_rl_loop.py                    # CPU
    python examples/ray_rl_loop.py --device cuda      # both actors on GPU 0
"""

from __future__ import annotations

import argparse
import os
import tempfile
from multiprocessing.connection import Client, Listener

import ray
import torch
import torch.distributed as dist

import loadfsm
from loadfsm import ColocatedReceiver, ColocatedSender, WeightReceiver, WeightSender
from loadfsm.reload.checksum import expected_checksums, layer_checksums
from loadfsm.reload.routes import checkpoint_tensors
from loadfsm.testing import build_model, load_reference_model, reference_state_dict

TRANSPORTS = ("colocated", "gloo")


def _join_gloo(tmp: str, rank: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/gloo", rank=rank,
                            world_size=2)


@ray.remote
class Trainer:
    """The bf16 policy and its optimizer; pushes after each step."""

    def __init__(self, config: str, device: str, lr: float, bucket_mb: int):
        torch.set_num_threads(1)
        self.config, self.device = config, torch.device(device)
        self.model = load_reference_model(config, seed=0, device=self.device).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.bucket_bytes = bucket_mb << 20
        self.colocated = self.gloo = None

    def connect(self, address: str, authkey: bytes, tmp: str) -> None:
        """Both transports: the engine's Unix socket, and a gloo group of two."""
        self.colocated = ColocatedSender(Client(address, "AF_UNIX", authkey=authkey),
                                         bucket_bytes=self.bucket_bytes, device=self.device)
        _join_gloo(tmp, rank=0)
        self.gloo = WeightSender(bucket_bytes=self.bucket_bytes)

    def step(self, step: int) -> float:
        ids = torch.randint(0, self.model.config.vocab_size, (4, 32), device=self.device,
                            generator=torch.Generator(self.device).manual_seed(step))
        loss = self.model(ids).float().logsumexp(-1).mean()      # any loss will do
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def push(self, transport: str, version: int) -> int:
        """Push the current weights; returns the bytes sent."""
        if transport == "colocated":
            return self.colocated(self.model.named_parameters(), version=version)
        return self.gloo(self.model.named_parameters())

    def weights(self) -> dict[str, torch.Tensor]:
        """What a fresh load of the current policy reads (for the engine's check)."""
        return {name: t.cpu().clone() for name, t in checkpoint_tensors(self.model)}

    def expected_checksums(self, quant: str) -> dict[str, int]:
        return expected_checksums(build_model(self.config), self.model.named_parameters(),
                                  quant=quant, device=self.device)

    def close(self) -> None:
        self.colocated.close()
        dist.destroy_process_group()


@ray.remote
class Engine:
    """The FP8 model loadfsm loaded; takes pushes in place."""

    def __init__(self, config: str, device: str, quant: str):
        torch.set_num_threads(1)
        self.config, self.device, self.quant = config, torch.device(device), quant
        self.model = build_model(config)
        loadfsm.load(self.model, reference_state_dict(config, seed=0).items(), quant=quant,
                     device=self.device)
        self.sync = loadfsm.WeightSync(self.model)
        self.addresses = {n: t.data_ptr() for n, t in self.model.state_dict().items()}
        self.listener = self.colocated = self.gloo = None

    def listen(self, address: str, authkey: bytes) -> None:
        self.listener = Listener(address, "AF_UNIX", authkey=authkey)

    def accept(self, tmp: str) -> None:
        """The trainer's connection, then the gloo group (the trainer joins both)."""
        self.colocated = ColocatedReceiver(self.sync, self.listener.accept())
        _join_gloo(tmp, rank=1)
        self.gloo = WeightReceiver(self.sync)

    def receive(self, transport: str) -> dict:
        # The colocated trainer sends its version with the push.
        report = (self.colocated if transport == "colocated" else self.gloo).receive()
        return {"layers": report.layers_updated, "mib": report.bytes_received / 2**20,
                "ms": report.seconds * 1e3, "version": report.version}

    def check(self, weights: dict[str, torch.Tensor], checksums: dict[str, int]) -> dict:
        """Compare with a fresh load of ``weights``: bit for bit, addresses, checksums."""
        fresh = build_model(self.config)
        loadfsm.load(fresh, weights.items(), quant=self.quant, device=self.device)
        expected, state = fresh.state_dict(), self.model.state_dict()
        return {
            "identical": all(torch.equal(t.reshape(-1).view(torch.uint8),
                                         expected[n].reshape(-1).view(torch.uint8))
                             for n, t in state.items()),
            "moved": [n for n, t in state.items() if t.data_ptr() != self.addresses[n]],
            "checksums": layer_checksums(self.sync) == checksums}

    def close(self) -> None:
        self.colocated.close()
        dist.destroy_process_group()


def run(args) -> list[dict]:
    """The loop; one record per step."""
    gpu = 0.5 if args.device == "cuda" else 0      # both actors on the same GPU
    with tempfile.TemporaryDirectory() as tmp:
        address, authkey = os.path.join(tmp, "colocated.sock"), os.urandom(16)
        trainer = Trainer.options(num_cpus=1, num_gpus=gpu).remote(
            args.config, args.device, args.lr, args.bucket_mb)
        engine = Engine.options(num_cpus=1, num_gpus=gpu).remote(
            args.config, args.device, args.quant)
        ray.get(engine.listen.remote(address, authkey))
        ray.get([engine.accept.remote(tmp), trainer.connect.remote(address, authkey, tmp)])
        records = []
        for step in range(args.steps):
            transport = TRANSPORTS[step % 2]
            loss = ray.get(trainer.step.remote(step))
            sent, pushed = ray.get([trainer.push.remote(transport, step),
                                    engine.receive.remote(transport)])
            verdict = ray.get(engine.check.remote(
                trainer.weights.remote(), trainer.expected_checksums.remote(args.quant)))
            records.append({"step": step, "transport": transport, "loss": loss, **pushed,
                            **verdict})
            print(f"step {step} [{transport:9}] loss {loss:.4f}: {pushed['layers']} layers, "
                  f"{pushed['mib']:.2f} MiB in {pushed['ms']:.0f} ms; identical to a fresh "
                  f"load: {verdict['identical']}; tensors moved: {len(verdict['moved'])}; "
                  f"checksums match: {verdict['checksums']}; version {pushed['version']}",
                  flush=True)
        ray.get([trainer.close.remote(), engine.close.remote()])
    return records


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--quant", default="fp8")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=10.0)
    parser.add_argument("--bucket-mb", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    try:
        records = run(args)
    finally:
        ray.shutdown()
    if not all(r["identical"] and not r["moved"] and r["checksums"] for r in records):
        raise SystemExit("the engine diverged from the trainer")
    print("every step: the engine serves exactly the trainer's weights")
    return records


if __name__ == "__main__":
    main()
