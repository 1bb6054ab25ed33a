"""The checkpoint reader runs ahead of the consumer in a thread: bounded by its ring,
correct for tensors larger than a ring buffer, and gone when the load ends, however it ends."""

import threading
import time

import pytest
import torch
from safetensors.torch import save_file

import loadfsm.sources.safetensors_dir as safetensors_dir
from loadfsm.sources.safetensors_dir import READ_AHEAD, SafetensorsSource
from loadfsm.sources.shard_file import ShardFile

STATE = {f"{i:02d}.weight": torch.full((64, 64), float(i)) for i in range(12)}


@pytest.fixture
def source(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file(STATE, str(file))
    src = SafetensorsSource(file)
    yield src
    src.close()


def _readers() -> int:
    return sum(t.name == "loadfsm-read-ahead" for t in threading.enumerate())


def test_reads_ahead_at_most_the_ring(source, monkeypatch):
    """While the consumer holds one tensor, the reader fills the other buffers and waits."""
    reads = []
    real = ShardFile.read_into
    monkeypatch.setattr(ShardFile, "read_into",
                        lambda self, name, out, pool=None: (reads.append(name),
                                                            real(self, name, out, pool))[1])
    items = source.read(None)
    name, tensor = next(items)
    time.sleep(0.3)                          # the reader has all the time it wants
    assert len(reads) == READ_AHEAD
    assert torch.equal(tensor, STATE[name])
    rest = [(n, t.clone()) for n, t in items]
    assert [name, *(n for n, _ in rest)] == sorted(STATE)
    assert all(torch.equal(t, STATE[n]) for n, t in rest)


def test_tensors_larger_than_a_ring_buffer_go_through_the_reused_buffer(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors_dir, "RING_BYTES", 64 * 64 * 4 - 1)
    file = tmp_path / "model.safetensors"
    save_file(STATE, str(file))
    src = SafetensorsSource(file)
    got = [(n, t.clone()) for n, t in src.read(None)]
    src.close()
    assert [n for n, _ in got] == sorted(STATE)
    assert all(torch.equal(t, STATE[n]) for n, t in got)


@pytest.mark.parametrize("stop_after", [0, 1, 5])
def test_the_reader_thread_ends_with_the_consumer(source, stop_after):
    """A consumer that stops early (an error in the load, a Ctrl-C) leaves no reader."""
    before = _readers()
    items = source.read(None)
    for _ in range(stop_after + 1):
        next(items)
    items.close()
    assert _readers() == before


def test_an_error_in_the_reader_reaches_the_consumer_at_its_tensor(source, monkeypatch):
    real, bad = ShardFile.read_into, sorted(STATE)[4]

    def read_into(self, name, out, pool=None):
        if name == bad:
            raise OSError("disk gone")
        real(self, name, out, pool)

    monkeypatch.setattr(ShardFile, "read_into", read_into)
    seen = []
    with pytest.raises(OSError, match="disk gone"):
        for name, _ in source.read(None):
            seen.append(name)
    assert seen == sorted(STATE)[:4] and _readers() == 0


def test_the_prefetch_hints_every_byte_ahead_and_no_thread_outlives_the_read(source,
                                                                            monkeypatch):
    """Every tensor's bytes are hinted to the kernel (in pieces, from threads of their
    own), before or while the reader reads them; the hint threads end with the read."""
    monkeypatch.setattr(safetensors_dir, "PREFETCH_PIECE", 4096)
    hinted = []
    monkeypatch.setattr(ShardFile, "prefetch",
                        lambda self, offset, nbytes: hinted.append((offset, nbytes)))
    got = [(n, t.clone()) for n, t in source.read(None)]
    assert all(torch.equal(t, STATE[n]) for n, t in got)
    shard = source.shard(sorted(STATE)[0])
    expected = sorted((shard.offsets[n] + at, min(4096, 64 * 64 * 4 - at))
                      for n in STATE for at in range(0, 64 * 64 * 4, 4096))
    assert sorted(hinted) == expected
    assert not [t for t in threading.enumerate() if t.name.startswith("loadfsm-prefetch")]
