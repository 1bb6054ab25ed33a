"""The pipelined torch.distributed transport over gloo, three processes: two senders that
each send what they own, an engine that skips what it does not host, layouts sent once."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import loadfsm
from loadfsm import DeltaPush, Fp8Config
from loadfsm.reload.routes import checkpoint_tensors
from loadfsm.reload.transport import SenderAbortedError, WeightReceiver, WeightSender
from loadfsm.reload.wire import Entry, decode_table, encode_table
from loadfsm.testing import build_model, load_reference_model, reference_state_dict
from checks import same
from faults import raising_after
from tiny_models import SMALL_MOE

BUCKET_BYTES = 16 << 10          # many buckets per push: the pipeline turns over
HOSTED = "model.layers.0."       # the partial engine hosts layer 0 only
DELTA_PARAM = "model.layers.1.self_attn.o_proj.weight"


def _owner(name):
    """Rank 1 owns layer 1, rank 0 everything else."""
    return 1 if name.startswith("model.layers.1.") else 0


def _fresh(seed):
    model = build_model(SMALL_MOE)
    loadfsm.load(model, reference_state_dict(SMALL_MOE, seed).items(), quant="fp8",
                 device="cpu")
    return model.state_dict()


def _engine(hosts=None, src=(0, 1)):
    model = build_model(SMALL_MOE)
    loadfsm.load(model, reference_state_dict(SMALL_MOE, 0).items(), quant="fp8", device="cpu")
    return model, WeightReceiver(loadfsm.WeightSync(model), src=list(src), hosts=hosts)


def _compare(model, seed, before=None, hosted=None):
    """Tensors that differ from a fresh load of ``seed`` (hosted ones) or changed (others)."""
    expected, wrong = _fresh(seed), []
    for name, tensor in model.state_dict().items():
        if hosted is None or name.startswith(hosted):
            wrong += [] if same(tensor, expected[name]) else [name]
        elif not same(tensor, before[name]):
            wrong.append(name)
    return wrong


def _multi_sender(rank, out):
    """Ranks 0 and 1 send the tensors they own; rank 2 applies both. Steps 1 and 2 push
    new weights over an unchanged layout; step 3: rank 0 sends nothing, rank 1 its tensors
    in reverse order (a new layout)."""
    if rank < 2:
        sender = WeightSender(src=rank, senders=[0, 1], bucket_bytes=BUCKET_BYTES)
        tables = []
        for seed in (1, 2):
            state = reference_state_dict(SMALL_MOE, seed)
            sender([(n, t) for n, t in state.items() if _owner(n) == rank])
            tables.append(sender.tables_sent)
        state = reference_state_dict(SMALL_MOE, 3)
        sender([(n, t) for n, t in reversed(state.items()) if _owner(n) == rank == 1])
        out[f"tables_sent{rank}"] = tables
        return
    model, receiver = _engine()
    for seed in (1, 2):
        report = receiver.receive()
        out[f"wrong{seed}"] = _compare(model, seed)
        out[f"tables{seed}"] = receiver.tables_received
        out[f"layers{seed}"] = report.layers_updated
    out["owners"] = receiver.owners
    before = {n: t.clone() for n, t in model.state_dict().items()}
    receiver.receive()
    out["wrong3"] = _compare(model, 3, before, hosted="model.layers.1.")
    out["tables3"] = receiver.tables_received


def _skipping(rank, out):
    """Rank 0 sends everything three times; rank 1 applies all, rank 2 what it hosts."""
    if rank == 0:
        sender = WeightSender(src=0, bucket_bytes=BUCKET_BYTES, buffers=3)
        for _ in range(3):
            sender(reference_state_dict(SMALL_MOE, 4).items())
        return
    asked = []

    def hosts(name):
        asked.append(name)
        return name.startswith(HOSTED)

    model, receiver = _engine(None if rank == 1 else hosts, src=[0])
    before = {n: t.clone() for n, t in model.state_dict().items()}
    report = receiver.receive()
    out["skip_wrong"] = _compare(model, 4, before, None if rank == 1 else HOSTED)
    out["skip_skipped"] = receiver.skipped
    out["skip_layers"] = report.layers_updated
    receiver.receive()            # the ring's buffers have grown to their sizes by now
    views = {key: id(kept[1]) for key, kept in receiver._views.items()}
    asked_before = len(asked)
    receiver.receive()
    out["skip_asked"] = (asked_before, len(asked))
    out["skip_views_kept"] = views == {key: id(kept[1]) for key, kept in receiver._views.items()}


def _aborting(rank, out):
    """Rank 0's iterator raises mid-push while rank 1 sends all it owns; then a retry."""
    if rank < 2:
        sender = WeightSender(src=rank, senders=[0, 1], bucket_bytes=BUCKET_BYTES)
        mine = [(n, t) for n, t in reference_state_dict(SMALL_MOE, 5).items()
                if _owner(n) == rank]
        if rank == 0:
            with pytest.raises(RuntimeError, match="optimizer blew up"):
                sender(raising_after(mine, 20, RuntimeError("optimizer blew up")))
        else:
            sender(mine)
        sender(mine)
        return
    model, receiver = _engine()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    try:
        receiver.receive()
        out["aborted"] = False
    except loadfsm.PushError as exc:
        out["aborted"] = isinstance(exc.__cause__, SenderAbortedError)
        out["uncommitted_changed"] = [
            n for n, t in model.state_dict().items()
            if n.rpartition(".")[0] not in exc.committed and not same(t, before[n])]
    receiver.receive()
    out["wrong_retry"] = _compare(model, 5)


def _trainer_weights(step):
    """The trainer's model at ``step``: seed 6, then layer 1's attention output halved."""
    model = load_reference_model(SMALL_MOE, seed=6)
    if step:
        with torch.no_grad():
            dict(model.named_parameters())[DELTA_PARAM].mul_(0.5)
    return model


def _delta(rank, out):
    """Rank 0 sends delta pushes (planned from the engine's class on meta); ranks 1 and 2
    apply them: the first push whole, the second one layer."""
    if rank == 0:
        trainer, sender = _trainer_weights(0), WeightSender(bucket_bytes=BUCKET_BYTES)
        delta = DeltaPush(Fp8Config(), build_model(SMALL_MOE))
        sizes = []
        for step in (0, 1):
            if step:
                with torch.no_grad():
                    dict(trainer.named_parameters())[DELTA_PARAM].mul_(0.5)
            sender(delta(trainer))
            delta.commit()
            sizes.append((delta.report.layers_sent, delta.report.bytes_skipped))
        out["delta_sizes"] = sizes
        return
    model, receiver = _engine(src=[0])
    for step in (0, 1):
        receiver.receive()
        fresh = build_model(SMALL_MOE)
        loadfsm.load(fresh, checkpoint_tensors(_trainer_weights(step)), quant="fp8",
                     device="cpu")
        expected = fresh.state_dict()
        out[f"delta_wrong{step}"] = [n for n, t in model.state_dict().items()
                                     if not same(t, expected[n])]


SCENARIOS = (_multi_sender, _skipping, _aborting, _delta)


def _worker(rank, tmp):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank,
                            world_size=3)
    try:
        out = {}
        for scenario in SCENARIOS:
            scenario(rank, out)
            dist.barrier()
        torch.save(out, f"{tmp}/out{rank}.pt")
        open(f"{tmp}/done{rank}", "w").close()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every scenario in one set of three processes; each rank's records."""
    tmp = tmp_path_factory.mktemp("pipelined")
    try:
        mp.spawn(_worker, args=(str(tmp),), nprocs=3, join=True)
    except mp.ProcessExitedException:
        # gloo can abort a process while it tears down; benign once every rank finished.
        if not all((tmp / f"done{rank}").exists() for rank in range(3)):
            raise
    return [torch.load(tmp / f"out{rank}.pt") for rank in range(3)]


def test_two_senders_push_what_each_owns(runs):
    """Two trainer ranks each send their own tensors; the engine equals a fresh load."""
    engine = runs[2]
    assert engine["wrong1"] == [] and engine["wrong2"] == []
    assert engine["layers1"] == engine["layers2"] > 0
    assert set(engine["owners"].values()) == {0, 1}
    assert all(rank == _owner(name) for name, rank in engine["owners"].items())


def test_layout_travels_once(runs):
    """Tables go with the first push only; a changed layout sends its tables again."""
    engine = runs[2]
    assert engine["tables1"] > 0 and engine["tables2"] == 0 and engine["tables3"] > 0
    assert runs[0]["tables_sent0"][1] == runs[1]["tables_sent1"][1] == 0
    assert engine["wrong3"] == []


def test_receiver_skips_what_it_does_not_host(runs):
    """An engine hosting layer 0 only applies layer 0 and leaves the rest as it was."""
    every, partial = runs[1], runs[2]
    assert every["skip_wrong"] == [] and partial["skip_wrong"] == []
    assert every["skip_skipped"] == 0 and partial["skip_skipped"] > 0
    assert 0 < partial["skip_layers"] < every["skip_layers"]


def test_receiver_works_out_each_layout_once(runs):
    """Once its buffers are sized, a push of a known layout asks ``hosts`` nothing and
    makes no views: the receiver's per-tensor work is the apply alone."""
    every, partial = runs[1], runs[2]
    before, after = partial["skip_asked"]
    assert before >= len(reference_state_dict(SMALL_MOE, 4)) and after == before
    assert every["skip_views_kept"] and partial["skip_views_kept"]


def test_one_sender_aborting_rolls_the_engine_back(runs):
    """One of two senders raising mid-push: the engine rolls back; the retry is exact."""
    engine = runs[2]
    assert engine["aborted"] and engine["uncommitted_changed"] == []
    assert engine["wrong_retry"] == []


def test_delta_pushes_over_gloo(runs):
    """Delta pushes through the transport: the second carries one layer; engines exact."""
    (first, skipped_first), (second, skipped_second) = runs[0]["delta_sizes"]
    assert skipped_first == 0 and second == 1 and skipped_second > 0
    assert all(runs[r][f"delta_wrong{s}"] == [] for r in (1, 2) for s in (0, 1))


def test_table_round_trips():
    """A bucket table decodes to what was encoded: names, dtypes, shapes, offsets."""
    entries = [Entry("a.weight", torch.bfloat16, (3, 4), 0),
               Entry("b.scale", torch.float32, (), 64),
               Entry("c.é", torch.float8_e4m3fn, (2, 0, 5), 128)]
    assert decode_table(encode_table(entries)) == entries
