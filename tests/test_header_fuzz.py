"""Fuzzed safetensors headers, header lengths, truncations and index files: the only
outcomes are a correct load or a typed ``LoadError``; never a crash, a hang or data from
outside the bytes the header names for each tensor."""

import json
import struct

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import loadfsm
from loadfsm.errors import LoadError
from loadfsm.sources.checkpoint_files import INDEX_NAME

STATE = {"0.weight": torch.randn(4, 4), "0.bias": torch.randn(4),
         "1.weight": torch.randn(2, 4), "1.bias": torch.randn(2)}
FIELDS = ("dtype", "shape", "data_offsets")
SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.sampled_from(["F32", "BF16", "U16", "I64", "F8_E4M3", "", "__metadata__"])
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=8)
small_ints = st.integers(-4, 80)


def model():
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))


def original(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(STATE, str(path))
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def pack(header, data, length=None):
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def outcome(source) -> None:
    """Load; success must give exactly the bytes the file's header names."""
    m = model()
    try:
        loadfsm.load(m, source, device="cpu")
    except LoadError:
        return
    for name, tensor in m.state_dict().items():
        expected = declared(source, name)
        assert torch.equal(tensor.reshape(-1).view(torch.uint8), expected), name


def declared(source, name):
    """The bytes ``name``'s header entry names, read independently of loadfsm."""
    files = [source] if source.is_file() else sorted(source.glob("*.safetensors"))
    for file in files:
        raw = file.read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + length])
        if name in header:
            start, end = header[name]["data_offsets"]
            return torch.frombuffer(bytearray(raw[8 + length + start:8 + length + end]),
                                    dtype=torch.uint8)
    raise AssertionError(f"{name} loaded but no header names it")


mutations = st.one_of(
    st.tuples(st.just("field"), st.sampled_from(sorted(STATE)), st.sampled_from(FIELDS),
              json_values),
    st.tuples(st.just("offset"), st.sampled_from(sorted(STATE)), st.integers(0, 1), small_ints),
    st.tuples(st.just("shape"), st.sampled_from(sorted(STATE)), st.lists(small_ints, max_size=3)),
    st.tuples(st.just("entry"), st.sampled_from(sorted(STATE)), json_values),
    st.tuples(st.just("extra"), st.text(max_size=6), json_values),
    st.tuples(st.just("drop"), st.sampled_from(sorted(STATE))),
    st.tuples(st.just("swap"), st.sampled_from(sorted(STATE)), st.sampled_from(sorted(STATE))),
)


def mutate(header, mutation):
    kind, *args = mutation
    if kind == "field":
        header[args[0]][args[1]] = args[2]
    elif kind == "offset":
        header[args[0]]["data_offsets"][args[1]] += args[2]
    elif kind == "shape":
        header[args[0]]["shape"] = args[1]
    elif kind in ("entry", "extra"):
        header[args[0]] = args[1]
    elif kind == "drop":
        del header[args[0]]
    else:
        header[args[0]]["data_offsets"], header[args[1]]["data_offsets"] = (
            header[args[1]]["data_offsets"], header[args[0]]["data_offsets"])


@SETTINGS
@given(mutation_list=st.lists(mutations, min_size=1, max_size=3))
def test_mutated_headers(tmp_path, mutation_list):
    header, data = original(tmp_path)
    for mutation in mutation_list:
        try:
            mutate(header, mutation)
        except (KeyError, TypeError, IndexError):
            pass    # its target was removed or replaced by an earlier mutation
    path = tmp_path / "mutated.safetensors"
    path.write_bytes(pack(header, data))
    outcome(path)


@SETTINGS
@given(length=st.one_of(st.integers(0, 2**64 - 1), st.integers(-64, 64)),
       cut=st.one_of(st.none(), st.integers(0, 600)),
       flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4))
def test_header_lengths_truncations_and_byte_flips(tmp_path, length, cut, flips):
    header, data = original(tmp_path)
    body_length = len(json.dumps(header).encode())
    declared_length = length if length > 64 else max(0, body_length + length)   # near or far
    raw = bytearray(pack(header, data, declared_length))
    for at, value in flips:
        raw[min(at, len(raw) - 1)] = value
    path = tmp_path / "mutated.safetensors"
    path.write_bytes(bytes(raw[:cut] if cut is not None else raw))
    outcome(path)


index_files = st.one_of(
    st.sampled_from(["a.safetensors", "b.safetensors", "../other/model.safetensors",
                     "/etc/passwd", "", ".", "sub", "sub/../a.safetensors",
                     "./b.safetensors", "a.safetensors/", "c.safetensors"]),
    json_values)


@SETTINGS
@given(weight_map=st.one_of(
    st.dictionaries(st.sampled_from([*sorted(STATE), "x"]), index_files, max_size=5),
    json_values),
    wrap=st.booleans())
def test_fuzzed_index_files(tmp_path, weight_map, wrap):
    ckpt = tmp_path / "ckpt"
    if not ckpt.exists():
        (ckpt / "sub").mkdir(parents=True)
        (tmp_path / "other").mkdir()
        save_file({k: v for k, v in STATE.items() if k.startswith("0.")},
                  str(ckpt / "a.safetensors"))
        save_file({k: v for k, v in STATE.items() if k.startswith("1.")},
                  str(ckpt / "b.safetensors"))
        save_file({k: torch.full_like(v, 7.0) for k, v in STATE.items()},
                  str(tmp_path / "other" / "model.safetensors"))
    body = {"weight_map": weight_map} if wrap else weight_map
    (ckpt / INDEX_NAME).write_text(json.dumps(body))
    m = model()
    try:
        loadfsm.load(m, ckpt, device="cpu")
    except LoadError:
        return
    for name, tensor in m.state_dict().items():    # never the other model's sevens
        assert torch.equal(tensor, STATE[name]), name
