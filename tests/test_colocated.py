"""Colocated transport on CPU: a trainer process shares memfd buckets (and its large
tensors' own storages, moved into shared memory) with the engine (this process), which
pushes views of them into its WeightSync; the same code as CUDA IPC."""

import math
import multiprocessing
import os
import threading
import time

import pytest
import torch
from multiprocessing.reduction import recv_handle, send_handle
from structlog.testing import capture_logs

import loadfsm
import loadfsm.loading.driver as driver
from loadfsm.reload.checksum import expected_checksums, layer_checksums
from loadfsm.reload.colocated import ColocatedSender, ReceiverDiedError, SenderDiedError
from loadfsm.reload import colocated_receiver
from loadfsm.reload.colocated_receiver import ColocatedReceiver
from loadfsm.reload.routes import checkpoint_tensors
from loadfsm.reload.transport import SenderAbortedError
from loadfsm.testing import build_model, load_reference_model, reference_state_dict
from checks import same, snapshot
from faults import raising_after
from tiny_models import SMALL, SMALL_MOE

STEPS = 3
BUCKET_BYTES = 16 << 10     # several buckets per push
DIRECT_MIN_BYTES = 32 << 10   # embedding, lm_head, qkv, o, gate_up read in place
CTX = multiprocessing.get_context("spawn")


def _train_step(model, optimizer, step):
    ids = torch.randint(0, model.config.vocab_size, (2, 8),
                        generator=torch.Generator().manual_seed(step))
    ids = ids.to(next(model.parameters()).device)
    loss = model(ids).float().square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _trainer(conn, config, tmp, steps, tail, device, direct_min_bytes):
    """Push ``steps`` optimizer steps (saving, before each, what a fresh load reads and the
    checksums the engine must show), then run ``tail`` (a fault) with the next weights."""
    model = load_reference_model(config, seed=0, device=device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=50.0)
    sender = ColocatedSender(conn, bucket_bytes=BUCKET_BYTES, device=device,
                             direct_min_bytes=direct_min_bytes)
    for step in range(steps + (tail is not None)):
        _train_step(model, optimizer, step)
        torch.save({"weights": {n: t.cpu().clone() for n, t in checkpoint_tensors(model)},
                    "checksums": expected_checksums(build_model(config),
                                                    model.named_parameters(), quant="fp8",
                                                    device=device)},
                   f"{tmp}/step{step}.pt")
        if step < steps:
            sender(model.named_parameters(), version=step)
    if tail is not None:
        TAILS[tail](sender, model, steps)
    sender.close()


def _abort_then_push(sender, model, step):
    with pytest.raises(RuntimeError, match="optimizer blew up"):
        sender(raising_after(model.named_parameters(), 5, RuntimeError("optimizer blew up")),
               version=step)
    sender(model.named_parameters(), version=step)


def _stall(sender, model, step):
    """Send part of a push, then go silent while alive (until the test kills us)."""
    sender(_then(model.named_parameters(), 9, lambda: time.sleep(3600)), version=step)


def _die(sender, model, step):
    """Send part of a push (several buckets), then be killed by the test."""
    import os
    import signal
    sender(_then(model.named_parameters(), 9, lambda: os.kill(os.getpid(), signal.SIGKILL)),
           version=step)


def _die_at_direct(sender, model, step):
    """Send a push's first tensor (the embedding, read in place), then be killed."""
    import os
    import signal
    sender(_then(model.named_parameters(), 1, lambda: os.kill(os.getpid(), signal.SIGKILL)),
           version=step)


def _stall_after_direct(sender, model, step):
    """Send a push's first tensor (the embedding, read in place), then go silent while
    alive (until the test kills us)."""
    sender(_then(model.named_parameters(), 1, lambda: time.sleep(3600)), version=step)


def _reallocate(sender, model, step):
    """The embedding moves to a new storage (same values); pushed three times."""
    embedding = model.model.embed_tokens.weight
    embedding.data = embedding.data.clone()
    for _ in range(3):
        sender(model.named_parameters(), version=step)


TAILS = {"abort": _abort_then_push, "stall": _stall, "die": _die,
         "die_at_direct": _die_at_direct, "stall_after_direct": _stall_after_direct,
         "reallocate": _reallocate}


def _then(items, n, action):
    items = iter(items)
    for _ in range(n):
        yield next(items)
    action()
    yield from items


def _engine(config, *, commit_bytes=None, trace=True, device="cpu"):
    model = build_model(config)
    loadfsm.load(model, reference_state_dict(config, 0).items(), quant="fp8", device=device)
    kwargs = {} if commit_bytes is None else {"commit_bytes": commit_bytes}
    return model, loadfsm.WeightSync(model, trace=trace, **kwargs)


def _start(config, tmp, steps, tail=None, device="cpu", keep_their_end=False,
           direct_min_bytes=DIRECT_MIN_BYTES):
    """The trainer in a process of its own; its connection's other end. With
    ``keep_their_end``, this process keeps a copy of the trainer's end open, so the
    trainer's death does not close the connection: only its pid tells."""
    ours, theirs = CTX.Pipe()
    process = CTX.Process(target=_trainer, args=(theirs, config, str(tmp), steps, tail,
                                                 device, direct_min_bytes))
    process.start()
    if keep_their_end:
        process.their_end = theirs          # kept open as long as the process object
    else:
        theirs.close()      # the trainer's death then closes the connection
    return process, ours


def _fresh(config, tmp, step, device="cpu"):
    saved = torch.load(f"{tmp}/step{step}.pt")
    fresh = build_model(config)
    loadfsm.load(fresh, saved["weights"].items(), quant="fp8", device=device)
    return fresh.state_dict(), saved["checksums"]


def _inside(tensor, shared):
    """Whether ``tensor`` starts inside one of the ``shared`` buffers."""
    return any(b.tensor.data_ptr() <= tensor.data_ptr() < b.tensor.data_ptr()
               + b.tensor.numel() for b in shared.values())


class _Recording:
    """A ``WeightSync`` that also records, for every tensor it is fed, whether it lies
    inside one of ``receiver``'s shared buckets when it arrives, or inside a trainer
    storage it maps (``direct``, by name)."""

    def __init__(self, sync):
        self.sync, self.session, self.device = sync, sync.session, sync.device
        self.receiver, self.inside, self.direct = None, [], set()

    def push(self, arrivals, version=None):
        def fed():
            for name, tensor in arrivals:
                if _inside(tensor, self.receiver.direct):
                    self.direct.add(name)
                self.inside.append(_inside(tensor, self.receiver.buckets)
                                   or name in self.direct)
                yield name, tensor
        return self.sync.push(fed(), version=version)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module",
                ids=["dense", "moe", "dense-borrowed", "dense-buckets-only", "dense-cuda-ipc",
                     "dense-cuda-ipc-buckets-only"],
                params=[(SMALL, "cpu", False, DIRECT_MIN_BYTES),
                        (SMALL_MOE, "cpu", False, DIRECT_MIN_BYTES),
                        (SMALL, "cpu", True, DIRECT_MIN_BYTES),
                        (SMALL, "cpu", False, math.inf),
                        pytest.param((SMALL, "cuda", False, DIRECT_MIN_BYTES), marks=CUDA),
                        pytest.param((SMALL, "cuda", False, math.inf), marks=CUDA)])
def pushes(request, tmp_path_factory):
    """Three steps pushed through shared buckets and, for tensors of at least
    ``DIRECT_MIN_BYTES``, the trainer's own storages (memfd and shared memory on CPU;
    CUDA IPC, both processes on one GPU); per step, how the engine compares. "borrowed":
    every plain layer pushed whole is committed straight from the shared memory, before
    the next tensor is read."""
    (config, device, borrow, direct_min), tmp = (request.param,
                                                 tmp_path_factory.mktemp("colocated"))
    model, sync = _engine(config, device=device)
    process, conn = _start(config, tmp, STEPS, device=device, direct_min_bytes=direct_min)
    recording = _Recording(sync)
    receiver = recording.receiver = ColocatedReceiver(recording, conn)
    addresses = {n: t.data_ptr() for n, t in model.state_dict().items()}
    previous, steps = snapshot(model), []
    borrow_min = driver.BORROW_MIN_BYTES
    driver.BORROW_MIN_BYTES = 0 if borrow else borrow_min
    try:
        for step in range(STEPS):
            report = receiver.receive()
            expected, checksums = _fresh(config, tmp, step, device)
            state = model.state_dict()
            steps.append(dict(
                report=report, version=sync.version, layer_versions=dict(sync.layer_versions),
                layers=len(sync.layer_versions), opened=receiver.buckets_opened,
                tables=receiver.tables_received, direct_min_bytes=direct_min,
                direct=set(recording.direct), direct_opened=receiver.direct_opened,
                direct_mapped=len(receiver.direct),
                large={n for n, t in load_reference_model(config, seed=0).named_parameters()
                       if t.nbytes >= direct_min},
                viewed=recording.inside and all(recording.inside),
                checksums_match=layer_checksums(sync) == checksums,
                mismatched=[n for n, t in state.items() if not same(t, expected[n])],
                moved=[n for n, t in state.items() if t.data_ptr() != addresses[n]],
                changed=any(not same(t, previous[n]) for n, t in state.items())))
            recording.inside.clear()
            recording.direct.clear()
            previous = snapshot(model)
    finally:
        driver.BORROW_MIN_BYTES = borrow_min
        receiver.close()
        process.join(timeout=60)
    return steps


def test_engine_matches_fresh_load_after_each_step(pushes):
    """After each step pushed through shared buckets, the engine equals a fresh FP8 load."""
    for record in pushes:
        assert record["mismatched"] == [] and record["changed"]
        assert record["report"].layers_updated == record["layers"]


def test_push_keeps_every_address(pushes):
    """No engine tensor moves across colocated pushes."""
    assert all(record["moved"] == [] for record in pushes)


def test_engine_reads_views_of_the_shared_buckets(pushes):
    """Every tensor the push is fed lies inside a shared bucket or a trainer storage the
    engine maps: no copy before the push."""
    assert all(record["viewed"] for record in pushes)


def test_large_tensors_are_read_from_the_trainers_storage(pushes):
    """Tensors of at least ``direct_min_bytes`` arrive as views of the trainer's own
    storage (the embedding among them), the rest through buckets; none with
    ``math.inf``."""
    for record in pushes:
        if record["direct_min_bytes"] == math.inf:
            assert record["direct"] == set() and record["direct_opened"] == 0
        else:
            assert "model.embed_tokens.weight" in record["direct"]
            assert record["direct"] == record["large"]
            assert record["report"].tensors_received > len(record["direct"])  # + buckets


def test_trainer_storages_are_mapped_for_good_from_the_second_push(pushes):
    """The engine maps each directly read storage in the first push and lets it go at its
    end (the trainer might free it); the second push, the trainer having kept it, maps
    it again for good; the third maps none."""
    if pushes[0]["direct_min_bytes"] == math.inf:
        pytest.skip("buckets only")
    first = pushes[0]["direct_opened"]
    assert first >= 2 and pushes[0]["direct_mapped"] == 0
    assert [record["direct_opened"] for record in pushes[1:]] == [2 * first] * (STEPS - 1)
    assert [record["direct_mapped"] for record in pushes[1:]] == [first] * (STEPS - 1)


def test_buckets_are_opened_once_and_reused(pushes):
    """The first push opens the shared buckets (several when every tensor goes through
    one); later pushes open none."""
    assert pushes[0]["opened"] >= (2 if pushes[0]["direct_min_bytes"] == math.inf else 1)
    assert [record["opened"] for record in pushes] == [pushes[0]["opened"]] * STEPS


def test_tables_are_sent_once_per_layout(pushes):
    """Once every bucket has grown to its largest (the first push, or the second: a bucket
    that grew is shared again, its tables with it), pushes of the same layout send no
    table: the engine reuses its views (and still matches a fresh load)."""
    assert pushes[0]["tables"] >= 1
    assert pushes[-1]["tables"] == pushes[-2]["tables"]


def test_every_layer_stamped_with_the_trainers_version(pushes):
    """Each push's version reaches the sync, its report and every layer it committed."""
    for step, record in enumerate(pushes):
        assert record["version"] == step and record["report"].version == step
        assert set(record["layer_versions"].values()) == {step}


def test_trainer_checksums_equal_the_engines(pushes):
    """The trainer's expected checksums equal the engine's after every push."""
    assert all(record["checksums_match"] for record in pushes)


def test_sender_abort_rolls_back_and_next_push_succeeds(tmp_path):
    """A trainer iterator that raises aborts the push: the engine keeps its weights, then
    takes the trainer's next push."""
    model, sync = _engine(SMALL)
    process, conn = _start(SMALL, tmp_path, 1, tail="abort")
    receiver = ColocatedReceiver(sync, conn)
    try:
        receiver.receive()
        before = snapshot(model)
        with pytest.raises(loadfsm.PushError) as caught:
            receiver.receive()
        assert isinstance(caught.value.__cause__, SenderAbortedError)
        assert all(same(t, before[n]) for n, t in model.state_dict().items())
        receiver.receive()
        expected, _ = _fresh(SMALL, tmp_path, 1)
        assert all(same(t, expected[n]) for n, t in model.state_dict().items())
        assert sync.version == 1
    finally:
        receiver.close()
        process.join(timeout=60)


def _check_died_mid_push(model, sync, logs, caught, old, new_step, tmp):
    """Committed layers are new, every other layer wholly old, all FINALIZED, and the
    engine said so (``SenderDiedError`` and ``push_failed``)."""
    committed = caught.value.committed
    expected, _ = _fresh(SMALL, tmp, new_step)
    for name, tensor in model.state_dict().items():
        layer = name.rpartition(".")[0]
        assert same(tensor, expected[name] if layer in committed else old[name]), name
    assert {rec.state for rec in sync.session.plan.layers.values()} == {
        loadfsm.LayerState.FINALIZED}
    failed = [e for e in logs if e["event"] == "push_failed"]
    assert failed and failed[-1]["error"] == "SenderDiedError"
    assert {name for name, v in sync.layer_versions.items() if v == new_step} == set(committed)
    assert sync.version == new_step - 1


@pytest.mark.parametrize("keep_their_end", [False, True], ids=["connection-closed", "pid-gone"])
def test_killed_trainer_leaves_uncommitted_layers_old(tmp_path, keep_their_end):
    """A trainer killed mid-push: layers it had committed are new, the rest wholly old; the
    engine raises SenderDiedError, then takes a new trainer's push."""
    model, sync = _engine(SMALL, commit_bytes=1)     # each layer commits once verified
    # Every tensor through buckets: the engine can still read what the trainer sent before
    # it died. A tensor read in place needs the trainer alive (the death before the first
    # read, in place, is test_colocated_direct's).
    process, conn = _start(SMALL, tmp_path, 1, tail="die", keep_their_end=keep_their_end,
                           direct_min_bytes=math.inf)
    receiver = ColocatedReceiver(sync, conn)
    try:
        receiver.receive()
        old = snapshot(model)
        with capture_logs() as logs, pytest.raises(SenderDiedError) as caught:
            receiver.receive()
        assert 0 < len(caught.value.committed) < len(sync.layer_versions)
        assert "is gone" in str(caught.value) or not keep_their_end
        _check_died_mid_push(model, sync, logs, caught, old, 1, tmp_path)
    finally:
        receiver.close()
        process.join(timeout=60)
    (tmp_path / "again").mkdir()
    again, conn = _start(SMALL, tmp_path / "again", 2)
    receiver = ColocatedReceiver(sync, conn)
    try:
        receiver.receive()
        receiver.receive()
        expected, _ = _fresh(SMALL, tmp_path / "again", 1)
        assert all(same(t, expected[n]) for n, t in model.state_dict().items())
    finally:
        receiver.close()
        again.join(timeout=60)


def test_silent_trainer_times_out_instead_of_hanging(tmp_path):
    """A trainer alive but silent mid-push fails the push after ``timeout_s``: the engine
    does not wait forever, and uncommitted layers keep their old weights."""
    model, sync = _engine(SMALL, commit_bytes=1)
    process, conn = _start(SMALL, tmp_path, 1, tail="stall")
    receiver = ColocatedReceiver(sync, conn, timeout_s=1.0)
    try:
        receiver.receive()
        old = snapshot(model)
        with capture_logs() as logs, pytest.raises(SenderDiedError, match="no message") as caught:
            receiver.receive()
        _check_died_mid_push(model, sync, logs, caught, old, 1, tmp_path)
    finally:
        receiver.close()
        process.kill()
        process.join(timeout=60)


def test_trainer_waits_for_the_engine_before_refilling_a_bucket():
    """With two buckets, the trainer sends two and waits; the engine's acknowledgement of
    bucket 0 lets it refill bucket 0, which it does not share again."""
    engine_end, trainer_end = multiprocessing.Pipe()
    sender = ColocatedSender(trainer_end, bucket_bytes=64, buckets=2,
                             direct_min_bytes=math.inf)
    tensors = [(f"t{i}", torch.full((16,), float(i))) for i in range(4)]   # 64 B each
    thread = threading.Thread(target=sender, args=(tensors,), daemon=True)
    thread.start()
    kinds = [engine_end.recv()["kind"] for _ in range(2)]
    for index in (0, 1):
        share = engine_end.recv()
        assert (share["kind"], share["index"]) == ("share", index)
        recv_handle(engine_end)
        assert engine_end.recv()["index"] == index
    assert kinds == ["hello", "begin"]
    assert not engine_end.poll(0.5)              # both buckets unacknowledged: it waits
    engine_end.send({"kind": "ack", "index": 0})
    refill = engine_end.recv()
    assert (refill["kind"], refill["index"]) == ("bucket", 0)
    for index in (1, 0):
        engine_end.send({"kind": "ack", "index": index})
    bucket = engine_end.recv()
    assert (bucket["kind"], bucket["index"]) == ("bucket", 1)
    engine_end.send({"kind": "ack", "index": 1})
    assert engine_end.recv()["kind"] == "end"
    thread.join(timeout=60)
    assert not thread.is_alive()
    sender.close()


def test_trainer_gone_between_pushes_is_reported_and_changes_nothing(tmp_path):
    """A trainer that exits after its last push: the engine's next receive raises
    SenderDiedError (committed nothing) instead of waiting forever."""
    model, sync = _engine(SMALL)
    process, conn = _start(SMALL, tmp_path, 1)
    receiver = ColocatedReceiver(sync, conn)
    try:
        receiver.receive()
        before = snapshot(model)
        with capture_logs() as logs, pytest.raises(SenderDiedError) as caught:
            receiver.receive()
        assert caught.value.committed == []
        assert [e["error"] for e in logs if e["event"] == "push_failed"] == ["SenderDiedError"]
        assert all(same(t, before[n]) for n, t in model.state_dict().items())
    finally:
        receiver.close()
        process.join(timeout=60)


def test_engine_gone_fails_the_trainers_push():
    """An engine that closes its connection while the trainer waits for an
    acknowledgement gives the trainer ReceiverDiedError, not a hang."""
    engine_end, trainer_end = multiprocessing.Pipe()
    sender = ColocatedSender(trainer_end, bucket_bytes=64, buckets=2,
                             direct_min_bytes=math.inf)
    raised = []

    def push():
        try:
            sender([(f"t{i}", torch.zeros(16)) for i in range(4)])
        except ReceiverDiedError as exc:
            raised.append(exc)

    thread = threading.Thread(target=push, daemon=True)
    thread.start()
    for _ in range(2):
        engine_end.recv()                     # hello, begin
    for _ in range(2):
        engine_end.recv()                     # share
        recv_handle(engine_end)
        engine_end.recv()                     # bucket
    engine_end.close()
    thread.join(timeout=60)
    assert len(raised) == 1 and not thread.is_alive()
    sender.close()


def _push_in_thread(sender, weights):
    thread = threading.Thread(target=sender, args=(list(weights.items()),), daemon=True)
    thread.start()
    return thread


def test_changed_layout_sends_its_tables_again():
    """A push whose tensors come in another order sends new tables and lands right; the
    next push in that order sends none."""
    model, sync = _engine(SMALL)
    engine_end, trainer_end = multiprocessing.Pipe()
    sender = ColocatedSender(trainer_end, bucket_bytes=BUCKET_BYTES)
    receiver = ColocatedReceiver(sync, engine_end)
    tables = []
    try:
        for seed, reverse in ((1, False), (2, True), (3, True)):
            weights = reference_state_dict(SMALL, seed)
            if reverse:
                weights = dict(reversed(weights.items()))
            thread = _push_in_thread(sender, weights)
            receiver.receive()
            thread.join(timeout=60)
            tables.append(receiver.tables_received)
            fresh = build_model(SMALL)
            loadfsm.load(fresh, weights.items(), quant="fp8")
            expected = fresh.state_dict()
            assert all(same(t, expected[n]) for n, t in model.state_dict().items()), seed
    finally:
        receiver.close()
        sender.close()
    assert tables[0] < tables[1] == tables[2]


class _SlowDevice:
    """Stands in for CUDA events on a busy device: a fence completes only after ``polls``
    queries, or when synchronized; each completion is logged."""

    def __init__(self, log, polls):
        self.log, self.polls, self.made = log, polls, 0

    def fence(self, device):
        index, self.made = self.made, self.made + 1
        device_log, left = self.log, [self.polls]

        class Fence:
            def query(self):
                left[0] -= 1
                if left[0] == -1:
                    device_log.append(("ran", index))
                return left[0] < 0

            def synchronize(self):
                if left[0] >= 0:
                    device_log.append(("ran", index))
                left[0] = -1
        return Fence()


def _share(conn, index, tensors):
    """What a trainer sends for a new bucket holding ``tensors`` (64 B each), and its
    bucket message."""
    conn.send({"kind": "share", "index": index, "size": 64 * len(tensors), "cuda": None})
    fd = os.memfd_create("test-bucket")
    os.ftruncate(fd, 64 * len(tensors))
    send_handle(conn, fd, 0)
    os.close(fd)
    conn.send({"kind": "bucket", "index": index, "tensors": [
        (name, (16,), torch.float32, 64 * i) for i, name in enumerate(tensors)]})


def _reading(receiver, log):
    def read():
        for name, _ in receiver.arrivals():
            log.append(("read", name))
    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_engine_queues_the_next_bucket_before_acknowledging_one_the_device_reads(
        monkeypatch):
    """While the device still reads bucket 0, a waiting bucket 1 is read (queued) first;
    each bucket is acknowledged only once its reads ran."""
    log = []
    monkeypatch.setattr(colocated_receiver, "read_fence", _SlowDevice(log, 10 ** 9).fence)
    engine_end, trainer_end = multiprocessing.Pipe()
    receiver = ColocatedReceiver(_Sink(), engine_end)
    _share(trainer_end, 0, ["a", "b"])
    _share(trainer_end, 1, ["c"])
    trainer_end.send({"kind": "end"})
    thread = _reading(receiver, log)
    acks = []
    for _ in range(2):
        assert trainer_end.poll(60)
        index = trainer_end.recv()["index"]
        acks.append((index, ("ran", index) in log))     # ran before it was acknowledged
    thread.join(timeout=60)
    receiver.close()
    assert log == [("read", "a"), ("read", "b"), ("read", "c"), ("ran", 0), ("ran", 1)]
    assert acks == [(0, True), (1, True)]


def test_idle_engine_acknowledges_once_the_device_ran_the_reads(monkeypatch):
    """With no message waiting, the engine waits for the device and acknowledges the
    bucket, so a trainer that needs it back is not left waiting."""
    log = []
    monkeypatch.setattr(colocated_receiver, "read_fence", _SlowDevice(log, 3).fence)
    engine_end, trainer_end = multiprocessing.Pipe()
    receiver = ColocatedReceiver(_Sink(), engine_end)
    _share(trainer_end, 0, ["a"])
    thread = _reading(receiver, log)
    assert trainer_end.poll(60)                          # nothing more sent until then
    assert trainer_end.recv()["index"] == 0
    assert log == [("read", "a"), ("ran", 0)]
    trainer_end.send({"kind": "end"})
    thread.join(timeout=60)
    receiver.close()
    assert not thread.is_alive()


class _Sink:
    device = torch.device("cpu")


class _Collect(_Sink):
    """Stands in for a ``WeightSync``: keeps a copy of every tensor it is fed."""

    session = None

    def __init__(self):
        self.got = {}

    def push(self, arrivals, version=None):
        self.got.update((name, tensor.clone()) for name, tensor in arrivals)


def test_strided_and_odd_sized_tensors_arrive_exact():
    """Transposed, sliced, 0-element and odd-byte-count tensors arrive bit-exact, in every
    push (the later ones through the kept views)."""
    engine_end, trainer_end = multiprocessing.Pipe()
    sender = ColocatedSender(trainer_end, bucket_bytes=256)
    sink = _Collect()
    receiver = ColocatedReceiver(sink, engine_end, stall_warning_s=None)
    try:
        for step in range(2):
            base = torch.arange(48, dtype=torch.float32).reshape(6, 8) + step
            tensors = {"transposed": base.t(), "sliced": base[:, 1::3],
                       "empty": torch.empty(0, 4, dtype=torch.bfloat16),
                       "odd": torch.arange(7, dtype=torch.uint8) + step,
                       "big": torch.randn(200, generator=torch.Generator().manual_seed(step))}
            thread = _push_in_thread(sender, tensors)
            receiver.receive()
            thread.join(timeout=60)
            assert sink.got.keys() == tensors.keys()
            assert all(same(sink.got[name], t) for name, t in tensors.items()), step
    finally:
        receiver.close()
        sender.close()
