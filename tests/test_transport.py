"""Bucketed weight transport over torch.distributed (gloo, two processes on CPU)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import loadfsm
from loadfsm.testing import build_model, load_reference_model, reference_state_dict
from loadfsm.reload.routes import checkpoint_tensors
from loadfsm.reload.transport import SenderAbortedError, WeightReceiver, WeightSender
from checks import same
from faults import raising_after
from tiny_models import SMALL, SMALL_MOE

STEPS = 3
# Small buckets: several per push, and tensors larger than a bucket travel alone.
BUCKET_BYTES = 16 << 10


def _train_step(model, optimizer, step):
    ids = torch.randint(0, model.config.vocab_size, (2, 8),
                        generator=torch.Generator().manual_seed(step))
    loss = model(ids).float().square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _trainer(config, tmp, fail_at):
    model = load_reference_model(config, seed=0).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=50.0)
    hook = WeightSender(bucket_bytes=BUCKET_BYTES)
    for step in range(STEPS):
        _train_step(model, optimizer, step)
        # What a fresh load of the trainer's weights reads, for the engine to compare.
        torch.save({n: t.clone() for n, t in checkpoint_tensors(model)}, f"{tmp}/step{step}.pt")
        if step == fail_at:
            with pytest.raises(RuntimeError, match="optimizer blew up"):
                hook(raising_after(model.named_parameters(), 5,
                                  RuntimeError("optimizer blew up")))
        hook(model.named_parameters())


def _engine(config, tmp, fail_at):
    """Receive every push; record, per step, how the engine compares with a fresh load."""
    model = build_model(config)
    report = loadfsm.load(model, reference_state_dict(config, 0).items(), quant="fp8",
                          device="cpu")
    receiver = WeightReceiver(loadfsm.WeightSync(model))
    addresses = {n: t.data_ptr() for n, t in model.state_dict().items()}
    previous = {n: t.clone() for n, t in model.state_dict().items()}
    steps = []
    for step in range(STEPS):
        record = {}
        if step == fail_at:
            try:
                receiver.receive()
            except loadfsm.PushError as exc:
                record["aborted"] = isinstance(exc.__cause__, SenderAbortedError)
                record["committed"] = exc.committed
                record["uncommitted_changed"] = [
                    n for n, t in model.state_dict().items()
                    if n.rpartition(".")[0] not in exc.committed
                    and not same(t, previous[n])]
        sync_report = receiver.receive(version=step)
        fresh = build_model(config)
        loadfsm.load(fresh, torch.load(f"{tmp}/step{step}.pt").items(), quant="fp8",
                     device="cpu")
        expected = fresh.state_dict()
        state = model.state_dict()
        record.update(
            version=(sync_report.version, receiver.sync.version, step),
            layers_updated=sync_report.layers_updated,
            layers=len(report.layer_states),
            mismatched=[n for n, t in state.items() if not same(t, expected[n])],
            moved=[n for n, t in state.items() if t.data_ptr() != addresses[n]],
            changed=any(not same(t, previous[n]) for n, t in state.items()))
        previous = {n: t.clone() for n, t in state.items()}
        steps.append(record)
    return steps


SCENARIOS = {"dense": (SMALL, -1), "moe": (SMALL_MOE, -1), "abort": (SMALL, 1)}


def _worker(rank, tmp):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank,
                            world_size=2)
    try:
        results = {}
        for name, (config, fail_at) in SCENARIOS.items():
            scenario_dir = f"{tmp}/{name}"
            if rank == 0:
                _trainer(config, scenario_dir, fail_at)
            else:
                results[name] = _engine(config, scenario_dir, fail_at)
        if rank == 1:
            torch.save(results, f"{tmp}/results.pt")
        dist.barrier()          # the trainer must not tear gloo down under the engine
        open(f"{tmp}/done{rank}", "w").close()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def pushes(tmp_path_factory):
    """Run every scenario in one pair of processes (spawning costs seconds); their records."""
    tmp = tmp_path_factory.mktemp("transport")
    for name in SCENARIOS:
        (tmp / name).mkdir()
    try:
        mp.spawn(_worker, args=(str(tmp),), nprocs=2, join=True)
    except mp.ProcessExitedException:
        # gloo can abort a process while it tears down ("terminate called without an
        # active exception"); only a crash after both ranks finished their work is benign.
        if not all((tmp / f"done{rank}").exists() for rank in (0, 1)):
            raise
    return torch.load(tmp / "results.pt")


@pytest.mark.parametrize("scenario", ["dense", "moe"])
def test_gloo_engine_matches_fresh_load_after_each_step(pushes, scenario):
    """After each of three optimizer steps pushed over gloo, the engine equals a fresh load
    and serves the version the receiver stamped."""
    for record in pushes[scenario]:
        assert record["mismatched"] == [] and record["changed"]
        assert record["layers_updated"] == record["layers"]
        report_version, sync_version, step = record["version"]
        assert report_version == sync_version == step


@pytest.mark.parametrize("scenario", ["dense", "moe"])
def test_gloo_push_keeps_every_address(pushes, scenario):
    """No engine tensor moves across pushes received over gloo."""
    assert all(record["moved"] == [] for record in pushes[scenario])


def test_sender_abort_rolls_engine_back_and_next_push_succeeds(pushes):
    """A trainer iterator that raises aborts the push: uncommitted layers keep old weights."""
    aborted = pushes["abort"][1]
    assert aborted["aborted"] and aborted["uncommitted_changed"] == []
    assert aborted["mismatched"] == [] and aborted["changed"]
