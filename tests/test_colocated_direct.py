"""Colocated transport, direct shares: large trainer tensors read in place from the
trainer's own storage (shared memory on CPU, CUDA IPC on a GPU), mixed with buckets."""

import gc
import multiprocessing
import os
import signal
import threading

import pytest
import torch
from multiprocessing.reduction import recv_handle
from structlog.testing import capture_logs

from loadfsm.reload.colocated import ColocatedSender, SenderDiedError
from loadfsm.reload.colocated_direct import DirectShares
from loadfsm.reload.colocated_receiver import ColocatedReceiver
from checks import same, snapshot
from test_colocated import (CTX, CUDA, _Collect, _check_died_mid_push, _engine, _fresh,
                            _inside, _start)
from tiny_models import SMALL

EMBEDDING = "model.embed_tokens.weight"
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


# -- which storages the engine maps, and for how long ------------------------------------

def test_a_storage_is_mapped_for_good_only_once_pushed_twice_in_a_row():
    """First push: shared, dropped at its end; second: shared again, kept; third: reused."""
    shares, storage = DirectShares(), torch.zeros(4).untyped_storage()
    assert shares.begin() == [] and shares.mapped(storage) is None
    first = shares.share_as(storage)
    assert shares.end() == [first]
    assert shares.begin() == [] and shares.mapped(storage) is None
    second = shares.share_as(storage)
    assert shares.end() == []
    assert shares.begin() == [] and shares.mapped(storage) == second
    assert shares.end() == []


def _mapped_for_good(shares, storage):
    """Two pushes in a row that read ``storage``: its mapping, now kept between pushes."""
    for _ in range(2):
        shares.begin()
        if shares.mapped(storage) is None:
            mapping = shares.share_as(storage)
        shares.end()
    return mapping


def test_a_storage_not_pushed_is_dropped_at_the_pushs_end():
    """A mapped storage that a push does not read is let go at that push's end."""
    shares, kept, other = (DirectShares(), torch.zeros(4).untyped_storage(),
                           torch.zeros(4).untyped_storage())
    mapping = _mapped_for_good(shares, kept)
    shares.begin()
    shares.mapped(other)
    shares.share_as(other)
    assert mapping in shares.end()
    shares.begin()
    assert shares.mapped(kept) is None           # forgotten: shared anew if it returns


def test_a_freed_storage_is_dropped_when_the_next_push_begins():
    """The trainer freed a mapped storage: the next push begins by letting it go."""
    shares, tensor = DirectShares(), torch.zeros(4)
    mapping = _mapped_for_good(shares, tensor.untyped_storage())
    del tensor
    gc.collect()
    assert shares.begin() == [mapping]


def test_a_new_storage_at_a_freed_ones_address_is_not_taken_for_it():
    """Same address, another storage object: shared anew, the old mapping dropped."""
    shares, old = DirectShares(), torch.zeros(4).untyped_storage()
    mapping = _mapped_for_good(shares, old)
    shares.begin()
    stale = shares._held.pop(old.data_ptr())
    new = torch.zeros(4).untyped_storage()
    shares._held[new.data_ptr()] = stale          # as if ``new`` took ``old``'s address
    assert shares.mapped(new) is None
    assert shares.share_as(new) != mapping
    assert mapping in shares.end()


# -- one process, a trainer thread ----------------------------------------------------------

def _push(sender, receiver, tensors):
    thread = threading.Thread(target=sender, args=(list(tensors.items()),), daemon=True)
    thread.start()
    receiver.receive()
    thread.join(timeout=60)
    assert not thread.is_alive()


class _Seen(_Collect):
    """Keeps a copy of every tensor fed, and the names that arrived as views of a trainer
    storage the receiver maps."""

    def __init__(self):
        super().__init__()
        self.receiver, self.direct = None, set()

    def push(self, arrivals, version=None):
        def fed():
            for name, tensor in arrivals:
                if _inside(tensor, self.receiver.direct):
                    self.direct.add(name)
                yield name, tensor
        super().push(fed(), version)


def _pair(**kwargs):
    engine_end, trainer_end = multiprocessing.Pipe()
    sender = ColocatedSender(trainer_end, bucket_bytes=256, **kwargs)
    sink = _Seen()
    receiver = sink.receiver = ColocatedReceiver(sink, engine_end, stall_warning_s=None)
    return sender, sink, receiver


def _mixed(device="cpu"):
    """Large tensors (contiguous, transposed, a slice at an offset, two names on one
    storage, half precision) and a small one; ``_step`` changes them in place."""
    base = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).to(device)
    flat = torch.randn(1024, generator=torch.Generator().manual_seed(1)).to(device)
    half = torch.randn(300, generator=torch.Generator().manual_seed(2)).half().to(device)
    return {"big": base, "transposed": base.t(), "offset": flat[100:400], "tied": base,
            "small": torch.arange(10, dtype=torch.float32, device=device), "half": half}


MIXED_DIRECT = {"big", "transposed", "offset", "tied", "half"}


def _step(tensors):
    tensors["big"].mul_(2)
    tensors["offset"].add_(1)


def _mixed_trainer(conn, device, steps):
    tensors = _mixed(device)
    sender = ColocatedSender(conn, bucket_bytes=256, direct_min_bytes=512, device=device)
    for _ in range(steps):
        sender(list(tensors.items()))
        _step(tensors)
    sender.close()


def test_direct_and_bucketed_tensors_in_one_push_arrive_exact():
    """Large tensors (contiguous, transposed, a slice at an offset, two names on one
    storage) are read in place, small ones through buckets, in one push; every push
    bit-exact, the trainer changing its tensors in place between them."""
    sender, sink, receiver = _pair(direct_min_bytes=512)
    tensors = _mixed()
    try:
        for step in range(3):
            _push(sender, receiver, tensors)
            assert all(same(sink.got[name], t) for name, t in tensors.items()), step
            assert sink.direct == MIXED_DIRECT
            assert not tensors["transposed"].is_contiguous()
            sink.direct.clear()
            _step(tensors)
    finally:
        receiver.close()
        sender.close()
    assert receiver.direct_opened == 6      # base, flat, half: in push 1 and in push 2


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_push_from_a_trainer_process_arrives_exact(device):
    """The same mixed pushes from a trainer process (CUDA IPC of its storages on a GPU),
    each bit-exact; the storages mapped in the first two pushes only."""
    ours, theirs = CTX.Pipe()
    process = CTX.Process(target=_mixed_trainer, args=(theirs, device, 3))
    process.start()
    theirs.close()
    sink = _Seen()
    sink.device = torch.device(device)
    receiver = sink.receiver = ColocatedReceiver(sink, ours, stall_warning_s=None)
    expected, opened = _mixed(device), []
    try:
        for step in range(3):
            receiver.receive()
            assert all(same(sink.got[name], t) for name, t in expected.items()), step
            assert sink.direct == MIXED_DIRECT
            opened.append(receiver.direct_opened)
            _step(expected)
    finally:
        receiver.close()
        process.join(timeout=60)
    assert opened == [3, 6, 6]


def test_a_push_of_many_direct_tensors_does_not_fill_the_connection():
    """Thousands of tensors read in place (views of one storage): the trainer takes the
    engine's acknowledgements as they come, so neither side blocks on a full
    connection, and all arrive exact."""
    sender, sink, receiver = _pair(direct_min_bytes=64)
    flat = torch.randn(8000 * 16, generator=torch.Generator().manual_seed(0))
    tensors = {f"t{i}": flat[i * 16:(i + 1) * 16] for i in range(8000)}
    engine = threading.Thread(target=_push, args=(sender, receiver, tensors), daemon=True)
    try:
        engine.start()
        engine.join(timeout=300)                  # both sides blocked: it never ends
        assert not engine.is_alive()
        assert len(sink.direct) == len(tensors) and receiver.direct_opened == 1
        assert all(same(sink.got[name], t) for name, t in tensors.items())
    finally:
        receiver.close()
        sender.close()


def test_a_reallocated_tensor_is_shared_again_and_its_old_storage_let_go():
    """A trainer tensor moved to a new storage between pushes is shared anew (the others
    are not) and arrives exact; the engine drops the old storage's mapping."""
    sender, sink, receiver = _pair(direct_min_bytes=512)
    tensors = {"a": torch.randn(256), "b": torch.randn(256), "small": torch.ones(4)}
    try:
        for _ in range(3):
            _push(sender, receiver, tensors)
        assert (receiver.direct_opened, len(receiver.direct)) == (4, 2)
        tensors["a"] = tensors["a"].clone() + 1
        _push(sender, receiver, tensors)
        assert same(sink.got["a"], tensors["a"])
        assert (receiver.direct_opened, len(receiver.direct)) == (5, 1)
        _push(sender, receiver, tensors)
        assert (receiver.direct_opened, len(receiver.direct)) == (6, 2)
        _push(sender, receiver, tensors)
        assert (receiver.direct_opened, len(receiver.direct)) == (6, 2)
        assert all(same(sink.got[name], t) for name, t in tensors.items())
    finally:
        receiver.close()
        sender.close()


def test_cpu_storage_moves_into_shared_memory_once():
    """On CPU a directly pushed tensor's storage moves into shared memory at its first
    push (the trainer keeps using it, values unchanged) and stays there."""
    sender, sink, receiver = _pair(direct_min_bytes=512)
    weight = torch.nn.Parameter(torch.randn(256))
    before = weight.detach().clone()
    try:
        _push(sender, receiver, {"w": weight})
        assert weight.is_shared() and same(weight.detach(), before)
        address = weight.data_ptr()
        _push(sender, receiver, {"w": weight})
        assert weight.data_ptr() == address
    finally:
        receiver.close()
        sender.close()


def _engine_end_of(sender_kwargs, tensors_fn):
    """A sender pushing ``tensors_fn()`` in a thread, and the engine's raw end."""
    engine_end, trainer_end = multiprocessing.Pipe()
    sender = ColocatedSender(trainer_end, bucket_bytes=256, **sender_kwargs)
    raised = []

    def push():
        try:
            sender(tensors_fn())
        except Exception as exc:
            raised.append(exc)

    thread = threading.Thread(target=push, daemon=True)
    thread.start()
    return sender, engine_end, thread, raised


def _take_direct(engine_end):
    """hello, begin, share (with its fd), direct: the direct message."""
    kinds = [engine_end.recv()["kind"] for _ in range(2)]
    share = engine_end.recv()
    os.close(recv_handle(engine_end))
    direct = engine_end.recv()
    assert (kinds, share["kind"], direct["kind"]) == (["hello", "begin"], "share", "direct")
    return direct


def test_trainer_holds_a_direct_tensor_until_the_engine_acknowledges_it():
    """The push does not return while the engine may still read a direct tensor; the
    acknowledgement releases it."""
    big = torch.randn(256)
    sender, engine_end, thread, raised = _engine_end_of({}, lambda: [("big", big)])
    direct = _take_direct(engine_end)
    assert [engine_end.recv()["kind"] for _ in range(2)] == ["drop", "end"]
    thread.join(timeout=0.5)
    [held] = sender._lent.values()
    assert thread.is_alive() and held.data_ptr() == big.data_ptr()
    engine_end.send({"kind": "ack", "lent": direct["lent"]})
    thread.join(timeout=60)
    assert not thread.is_alive() and raised == [] and sender._lent == {}
    sender.close()


def test_an_aborted_push_raises_only_once_the_engine_stopped_reading():
    """A trainer iterator that raises after a direct tensor aborts the push, but the
    sender raises only after the engine acknowledged that tensor: the trainer may then
    change it."""
    def tensors():
        yield "big", torch.randn(256)
        raise RuntimeError("optimizer blew up")

    sender, engine_end, thread, raised = _engine_end_of({}, tensors)
    direct = _take_direct(engine_end)
    assert engine_end.recv()["kind"] == "abort"
    thread.join(timeout=0.5)
    assert thread.is_alive() and raised == []
    engine_end.send({"kind": "ack", "lent": direct["lent"]})
    thread.join(timeout=60)
    assert [type(exc) for exc in raised] == [RuntimeError]
    sender.close()


def test_tensors_below_direct_min_bytes_go_through_buckets():
    """Small and empty tensors are copied into a bucket; no storage is shared."""
    sender, sink, receiver = _pair(direct_min_bytes=512, device="cpu")
    tensors = {"small": torch.randn(100), "empty": torch.empty(0, 1024)}
    try:
        _push(sender, receiver, tensors)
        assert sink.direct == set() and receiver.direct_opened == 0
        assert all(same(sink.got[name], t) for name, t in tensors.items())
    finally:
        receiver.close()
        sender.close()


def test_direct_min_bytes_below_one_is_refused():
    """``direct_min_bytes`` must be at least 1 (``math.inf``: buckets only)."""
    with pytest.raises(ValueError, match="direct_min_bytes"):
        ColocatedSender(multiprocessing.Pipe()[0], direct_min_bytes=0)


# -- a trainer process ---------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_reallocated_trainer_tensor_lands_and_the_engine_lets_the_old_one_go(
        tmp_path, device):
    """The trainer moves its embedding to a new storage between pushes: the engine maps
    the new one (shared twice, then kept), drops the old, and equals a fresh load."""
    model, sync = _engine(SMALL, device=device)
    process, conn = _start(SMALL, tmp_path, 2, tail="reallocate", device=device)
    receiver = ColocatedReceiver(sync, conn)
    try:
        for _ in range(2):
            receiver.receive()
        opened, mapped = receiver.direct_opened, len(receiver.direct)
        counts = []
        for _ in range(3):
            receiver.receive()
            counts.append((receiver.direct_opened - opened, len(receiver.direct) - mapped))
            expected, _ = _fresh(SMALL, tmp_path, 2, device)
            assert all(same(t, expected[n]) for n, t in model.state_dict().items())
        assert counts == [(1, -1), (2, 0), (2, 0)]
    finally:
        receiver.close()
        process.join(timeout=60)


@pytest.mark.parametrize("device", DEVICES)
def test_trainer_dead_before_its_direct_tensor_is_read_changes_nothing(tmp_path, device):
    """A trainer killed right after sending a direct tensor: the engine does not read the
    dead trainer's memory; it raises SenderDiedError with nothing committed."""
    model, sync = _engine(SMALL, commit_bytes=1, device=device)
    process, conn = _start(SMALL, tmp_path, 1, tail="die_at_direct", device=device)
    receiver = ColocatedReceiver(sync, conn)
    try:
        receiver.receive()
        old = snapshot(model)
        process.join(timeout=60)
        with capture_logs() as logs, pytest.raises(SenderDiedError) as caught:
            receiver.receive()
        assert caught.value.committed == []
        _check_died_mid_push(model, sync, logs, caught, old, 1, tmp_path)
    finally:
        receiver.close()


class _KillAt:
    """A ``WeightSync`` that kills the trainer when ``name`` arrives, then goes on."""

    def __init__(self, sync, name, process):
        self.sync, self.session, self.device = sync, sync.session, sync.device
        self.name, self.process = name, process

    def push(self, arrivals, version=None):
        def fed():
            for name, tensor in arrivals:
                if name == self.name:
                    os.kill(self.process.pid, signal.SIGKILL)
                    self.process.join(timeout=60)
                yield name, tensor
        return self.sync.push(fed(), version=version)


def test_trainer_killed_while_its_direct_tensor_is_read(tmp_path):
    """A trainer killed while the engine reads its embedding in place: that layer commits
    whole (the trainer had finished writing it; the engine's mapping stays valid), every
    other layer stays wholly old, and the engine says so."""
    model, sync = _engine(SMALL, commit_bytes=1)
    process, conn = _start(SMALL, tmp_path, 1, tail="stall_after_direct")
    receiver = ColocatedReceiver(sync, conn)
    try:
        receiver.receive()
        old = snapshot(model)
        receiver.sync = _KillAt(sync, EMBEDDING, process)
        with capture_logs() as logs, pytest.raises(SenderDiedError) as caught:
            receiver.receive()
        assert caught.value.committed == ["model.embed_tokens"]
        _check_died_mid_push(model, sync, logs, caught, old, 1, tmp_path)
    finally:
        receiver.close()
        process.join(timeout=60)
