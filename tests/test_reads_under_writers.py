"""Reads that survive other writers: a checkpoint truncated or rewritten during a load
gives a typed error naming the file (never SIGBUS), and kill -9 during a load leaves the
checkpoint's bytes unchanged."""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from loadfsm.errors import CheckpointChangedError
from loadfsm.sources.safetensors_dir import SafetensorsSource
from loadfsm.sources.safetensors_slices import safetensors_weights

STATE = {f"{i}.weight": torch.randn(256, 256) for i in range(4)}
LAST = sorted(STATE)[-1]


@pytest.fixture
def path(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file(STATE, str(file))
    return file


def test_truncated_after_the_header_was_read(path):
    source = SafetensorsSource(path)
    source.entries()
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(CheckpointChangedError, match="truncated|changed") as err:
        dict(source.read(None))
    assert err.value.file == str(path) and err.value.tensor in STATE
    source.close()


def test_large_tensors_read_by_threads_and_truncated(tmp_path):
    big = {"a": torch.randn(1024, 1500), "b": torch.randn(1500, 1024)}   # 6 MB each: split
    file = tmp_path / "big.safetensors"
    save_file(big, str(file))
    source = SafetensorsSource(file)
    assert all(torch.equal(t, big[n]) for n, t in source.read(None))
    os.truncate(file, file.stat().st_size - 3_000_000)   # inside b, past its first chunk
    with pytest.raises(CheckpointChangedError, match="truncated") as err:
        source.read_tensor("b")
    assert (err.value.file, err.value.tensor) == (str(file), "b")
    source.close()


def test_rewritten_in_place_with_the_same_size(path):
    source = SafetensorsSource(path)
    names = iter(source.read(None))
    first = next(names)
    assert torch.equal(first[1], STATE[first[0]])
    with open(path, "r+b") as f:       # same size, other bytes, a later modification time
        f.seek(-4, os.SEEK_END)
        f.write(b"\0\0\0\0")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(CheckpointChangedError, match="changed during the load"):
        list(names)
    source.close()


def test_lazy_slices_after_truncation(path):
    weights = dict(safetensors_weights(path))
    assert torch.equal(weights[LAST].narrow(1, 10, 20).read(), STATE[LAST][:, 10:30])
    os.truncate(path, 100)
    with pytest.raises(CheckpointChangedError) as err:
        weights[LAST].narrow(0, 5, 10).read()
    assert err.value.file == str(path)


def test_lazy_slices_read_the_right_regions(path):
    weights = dict(safetensors_weights(path))
    tensor = weights["1.weight"]
    for region, want in [(tensor.narrow(0, 3, 7), STATE["1.weight"][3:10]),
                         (tensor.narrow(1, 100, 56).narrow(0, 2, 9),
                          STATE["1.weight"][2:11, 100:156]),
                         (tensor, STATE["1.weight"])]:
        assert torch.equal(region.read(), want)


CHILD = textwrap.dedent("""
    import os, sys, torch
    from torch import nn
    import loadfsm
    from loadfsm import LoadSession
    path, action = sys.argv[1], sys.argv[2]
    arrive = LoadSession.arrive
    def hooked(self, name, tensor):
        arrive(self, name, tensor)
        if action == "truncate":
            os.truncate(path, 4096)     # another writer, between two tensor reads
        else:
            print("loading", flush=True)
            sys.stdin.readline()        # wait here to be killed
    LoadSession.arrive = hooked
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(256, 256, bias=False) for _ in range(4)])
    try:
        loadfsm.load(model, path, device="cpu", trace=path + ".trace.jsonl")
    except loadfsm.CheckpointChangedError as exc:
        print("typed", exc.file, flush=True)
        sys.exit(3)
    print("loaded", flush=True)
""")


def child(path, action):
    return subprocess.Popen([sys.executable, "-c", CHILD, str(path), action],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_truncated_during_a_load_in_a_subprocess(path):
    proc = child(path, "truncate")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, (proc.returncode, out)   # SIGBUS would be -7
    assert out.split() == ["typed", str(path)]


def test_kill_9_during_a_load_leaves_the_checkpoint_unchanged(path):
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    stat = path.stat()
    proc = child(path, "wait")
    assert proc.stdout.readline().strip() == "loading"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert path.stat().st_mtime_ns == stat.st_mtime_ns
