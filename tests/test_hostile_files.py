"""Hostile and careless checkpoints: confinement to the checkpoint directory, special
files, malformed indexes, a trace path naming an input, bad iterator items, ``meta``."""

import contextlib
import hashlib
import json
import os
import threading
import time

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import loadfsm
from loadfsm.errors import (BadWeightItemError, CorruptCheckpointError,
                            TraceOverwritesInputError, UnsafeCheckpointPathError,
                            UnsupportedDeviceError)
from loadfsm.sources.checkpoint_files import INDEX_NAME
from loadfsm.sources.safetensors_dir import SafetensorsSource

STATE = {"0.weight": torch.randn(8, 8), "0.bias": torch.randn(8),
         "1.weight": torch.randn(4, 8), "1.bias": torch.randn(4)}
FIRST = {k: v for k, v in STATE.items() if k.startswith("0.")}
SECOND = {k: v for k, v in STATE.items() if k.startswith("1.")}
INDEX = {k: ("a.safetensors" if k.startswith("0.") else "b.safetensors") for k in STATE}


def model():
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))


def load(source, **kwargs):
    m = model()
    loadfsm.load(m, source, device="cpu", **kwargs)
    return m


def assert_loaded(m, state=STATE):
    for name, tensor in m.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def shards(directory, index=INDEX, first="a.safetensors"):
    directory.mkdir(parents=True, exist_ok=True)
    save_file(FIRST, str(directory / first))
    save_file(SECOND, str(directory / "b.safetensors"))
    if index is not None:
        (directory / INDEX_NAME).write_text(json.dumps({"weight_map": index}))
    return directory


@pytest.fixture
def foreign(tmp_path):
    """Another model's weights (every value 7) next to the checkpoint directory."""
    path = tmp_path / "other" / "model.safetensors"
    path.parent.mkdir()
    save_file({k: torch.full_like(v, 7.0) for k, v in STATE.items()}, str(path))
    return path


@pytest.mark.parametrize("entry", ["../other/model.safetensors", "{foreign}", "/etc/passwd",
                                   "sub/../../other/model.safetensors", "/dev/null", "", "\0x"])
def test_index_entry_outside_the_directory_is_refused(tmp_path, foreign, entry):
    entry = entry.format(foreign=foreign)
    ckpt = shards(tmp_path / "ckpt", {**INDEX, "1.weight": entry, "1.bias": entry})
    (ckpt / "sub").mkdir()
    (ckpt / "b.safetensors").unlink()   # following the entry would load the foreign one
    with pytest.raises(UnsafeCheckpointPathError) as err:
        load(ckpt)
    assert err.value.file


def test_symlink_leaving_the_directory_is_refused(tmp_path, foreign):
    ckpt = shards(tmp_path / "ckpt", {**INDEX, "1.weight": "c.safetensors",
                                      "1.bias": "c.safetensors"})
    (ckpt / "b.safetensors").unlink()
    (ckpt / "c.safetensors").symlink_to(foreign)
    with pytest.raises(UnsafeCheckpointPathError, match="links to") as err:
        load(ckpt)
    assert err.value.file == str(ckpt / "c.safetensors")


def test_symlink_re_pointed_outside_after_the_check_is_refused(tmp_path, foreign):
    ckpt = shards(tmp_path / "ckpt", {**INDEX, "1.weight": "c.safetensors",
                                      "1.bias": "c.safetensors"})
    (ckpt / "c.safetensors").symlink_to(ckpt / "b.safetensors")
    source = SafetensorsSource(ckpt)          # paths checked here, files opened later
    (ckpt / "c.safetensors").unlink()
    (ckpt / "c.safetensors").symlink_to(foreign)
    with pytest.raises(UnsafeCheckpointPathError, match="replaced after") as err:
        source.entries()
    assert err.value.file == str(ckpt / "c.safetensors")


def test_symlink_out_of_an_unindexed_directory_is_refused(tmp_path, foreign):
    ckpt = shards(tmp_path / "ckpt", index=None)
    (ckpt / "b.safetensors").unlink()
    (ckpt / "b.safetensors").symlink_to(foreign)
    with pytest.raises(UnsafeCheckpointPathError):
        load(ckpt)


def test_symlinks_inside_the_directory_and_the_hub_cache_layout_load(tmp_path):
    inside = shards(tmp_path / "inside", first="real-a.safetensors",
                    index={**INDEX, **{k: "link/a.safetensors" for k in FIRST}})
    (inside / "link").mkdir()
    (inside / "link" / "a.safetensors").symlink_to(inside / "real-a.safetensors")
    assert_loaded(load(inside))
    # huggingface_hub: snapshots/<rev>/<file> -> ../../blobs/<sha>
    repo = tmp_path / "models--x--y"
    shards(repo / "blobs")
    snapshot = repo / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    for name in ("a.safetensors", "b.safetensors", INDEX_NAME):
        (snapshot / name).symlink_to(os.path.join("..", "..", "blobs", name))
    assert_loaded(load(snapshot))


def test_special_files_in_the_directory_are_refused(tmp_path):
    ckpt = shards(tmp_path / "dir", {**INDEX, "1.bias": "sub"})
    (ckpt / "sub").mkdir()
    with pytest.raises(UnsafeCheckpointPathError, match="directory"):
        load(ckpt)
    glob = shards(tmp_path / "glob", index=None)
    (glob / "z.safetensors").mkdir()
    with pytest.raises(UnsafeCheckpointPathError, match="directory"):
        load(glob)


@pytest.fixture
def unblock():
    """Opens each FIFO for writing after a few seconds, then closes it: a reader that
    blocked on it gets EOF (a wrong error) instead of hanging the test run."""
    fifos, done = [], threading.Event()

    def writer():
        deadline = time.monotonic() + 5
        while not done.wait(0.05):
            if time.monotonic() < deadline:
                continue
            for fifo in fifos:
                with contextlib.suppress(OSError):      # ENXIO: no reader (yet)
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    yield fifos.append
    done.set()
    thread.join()


@pytest.mark.parametrize("where", ["glob", "index", "as_index", "single"])
def test_fifo_is_refused_without_blocking(tmp_path, unblock, where):
    if where == "single":
        ckpt = tmp_path / "model.safetensors"
        fifo = ckpt
    else:
        ckpt = shards(tmp_path / "ckpt", None if where == "glob" else
                      {**INDEX, "1.bias": "c.safetensors"})
        fifo = ckpt / (INDEX_NAME if where == "as_index" else "c.safetensors")
        if where == "as_index":
            fifo.unlink()
    os.mkfifo(fifo)
    unblock(fifo)
    with pytest.raises(UnsafeCheckpointPathError, match="FIFO") as err:
        load(ckpt)
    assert err.value.file == str(fifo)


@pytest.mark.parametrize("index, match", [
    ({"weight_map": [1, 2]}, "weight_map is a list"),
    ({"weight_map": "a.safetensors"}, "weight_map is a str"),
    ({"weight_map": {"0.weight": 3}}, "not a string"),
    ({"weight_map": {"0.weight": None}}, "not a string"),
    ({"weight_map": {"0.weight": ["a.safetensors"]}}, "not a string"),
    ({"metadata": {}}, "unreadable index"),
    ([1], "unreadable index"),
    ("not json{", "unreadable index"),
])
def test_malformed_index_values_raise_typed_errors(tmp_path, index, match):
    ckpt = shards(tmp_path / "ckpt", None)
    text = index if isinstance(index, str) else json.dumps(index)
    (ckpt / INDEX_NAME).write_text(text)
    with pytest.raises(CorruptCheckpointError, match=match) as err:
        load(ckpt)
    assert err.value.file == str(ckpt / INDEX_NAME)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("target", [INDEX_NAME, "b.safetensors", "single"])
def test_trace_naming_an_input_is_refused_before_writing(tmp_path, target):
    ckpt = shards(tmp_path / "ckpt")
    if target == "single":
        ckpt = tmp_path / "one.safetensors"
        save_file(STATE, str(ckpt))
        trace = ckpt
    else:
        trace = ckpt / target
    before = digest(trace)
    alias = tmp_path / "alias.jsonl"
    alias.symlink_to(trace)
    for path in (trace, str(trace), alias):
        with pytest.raises(TraceOverwritesInputError) as err:
            load(ckpt, trace=path)
        assert err.value.file == str(trace)
        assert digest(trace) == before
    assert_loaded(load(ckpt, trace=tmp_path / "trace.jsonl"))
    assert (tmp_path / "trace.jsonl").stat().st_size > 0


def test_hf_trace_naming_an_input_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    import loadfsm.hf
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=64,
                                      num_attention_heads=2, intermediate_size=64)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    for name in ("config.json", "model.safetensors"):
        before = digest(tmp_path / name)
        with pytest.raises(TraceOverwritesInputError):
            loadfsm.hf.from_pretrained(tmp_path, quant=None, device="cpu",
                                       trace=tmp_path / name)
        assert digest(tmp_path / name) == before


class OneEmpty(nn.Module):
    def __init__(self):
        super().__init__()
        self.empty = nn.Parameter(torch.empty(0, 4))
        self.full = nn.Parameter(torch.empty(4))


def test_zero_size_tensors_load_from_files_and_iterators(tmp_path):
    state = {"empty": torch.empty(0, 4), "full": torch.arange(4.0)}
    path = tmp_path / "zero.safetensors"
    save_file(state, str(path))
    for source in (path, list(state.items())):
        with torch.device("meta"):
            m = OneEmpty()
        loadfsm.load(m, source, device="cpu")
        assert m.empty.shape == (0, 4) and not m.empty.is_meta
        assert torch.equal(m.full, state["full"])


def test_zero_size_tensor_for_a_non_empty_parameter_is_a_shape_error():
    with pytest.raises(loadfsm.ShapeMismatchError):
        load([("0.weight", torch.empty(0, 8)), *list(STATE.items())[1:]])


@pytest.mark.parametrize("weights, match", [
    ([("0.weight", STATE["0.weight"], 1)], "not a \\(name, tensor\\) pair"),
    ([STATE["0.weight"]], "is a Tensor"),
    (["0.weight"], "is a str"),
    ([(3, STATE["0.weight"])], "name of type int"),
    ([("0.weight", [[1.0] * 8] * 8)], "value is a list"),
    ([("0.weight", None)], "value is a NoneType"),
    ([("0.weight", 1.5)], "value is a float"),
    ([("0.weight", torch.empty(8, 8, device="meta"))], "meta device"),
    (dict(STATE), "pass its .items()"),
    (5, "iterable of"),
])
def test_bad_iterator_items_raise_typed_errors(weights, match):
    with pytest.raises(BadWeightItemError, match=match):
        load(weights)


def test_items_after_good_ones_are_checked_too():
    with pytest.raises(BadWeightItemError, match="value is a str") as err:
        load([*STATE.items(), ("extra", "x")])
    assert err.value.tensor == "extra"


@pytest.mark.parametrize("source", ["iterator", "file"])
def test_meta_device_is_refused(tmp_path, source):
    path = tmp_path / "m.safetensors"
    save_file(STATE, str(path))
    m = model()
    with pytest.raises(UnsupportedDeviceError):
        loadfsm.load(m, path if source == "file" else list(STATE.items()), device="meta")
