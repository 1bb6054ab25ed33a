"""Core load path on tiny models: states, bit-exact bf16, exact trace, typed errors."""

import json

import pytest
import torch
from structlog.testing import capture_logs

import loadfsm
from loadfsm.pieces import Piece
from tiny_models import FusedQKVModel, NormAndLinears, meta_model, random_state, write


def _transitions(logs, layer):
    return [(e["src"], e["dst"], e["trigger"]) for e in logs
            if e["event"] == "layer_transition" and e["layer"] == layer]


def test_bf16_load_is_bit_identical_and_finalized(tmp_path):
    """Without quantization every tensor equals its checkpoint tensor, every layer FINALIZED."""
    state = random_state(NormAndLinears)
    model = meta_model(NormAndLinears)
    report = loadfsm.load(model, write(state, tmp_path / "m.safetensors"), device="cpu")
    assert report.states["FINALIZED"] == 3 and report.states["PARTIAL"] == 0
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_fused_layer_transition_sequence_is_exact(tmp_path):
    """A fused qkv layer logs arrive x3, complete, quantize, finalize, in that order."""
    model = meta_model(FusedQKVModel)
    path = write(random_state(FusedQKVModel), tmp_path / "m.safetensors")
    with capture_logs() as logs:
        loadfsm.load(model, path, quant="fp8", device="cpu", trace=True)
    assert _transitions(logs, "qkv_proj") == [
        ("META", "PARTIAL", "arrive"), ("PARTIAL", "PARTIAL", "arrive"),
        ("PARTIAL", "PARTIAL", "arrive"), ("PARTIAL", "COMPLETE", "complete"),
        ("COMPLETE", "QUANTIZED", "quantize"), ("QUANTIZED", "FINALIZED", "finalize")]
    pieces = [e["piece"] for e in logs if e.get("trigger") == "arrive"]
    assert pieces == ["q_proj.weight", "k_proj.weight", "v_proj.weight"]
    assert [e["event"] for e in logs][-1] == "load_complete"


def test_fused_pieces_land_in_their_rows(tmp_path):
    """q, k and v fill rows [0:64], [64:96], [96:128] of the fused weight."""
    state = random_state(FusedQKVModel)
    model = meta_model(FusedQKVModel)
    loadfsm.load(model, write(state, tmp_path / "m.safetensors"), device="cpu")
    expect = torch.cat([state["q_proj.weight"], state["k_proj.weight"], state["v_proj.weight"]])
    assert torch.equal(model.qkv_proj.weight, expect)


def test_trace_file_is_json_lines(tmp_path):
    """trace=path writes one JSON object per line, transitions and a summary."""
    model = meta_model(NormAndLinears)
    path = write(random_state(NormAndLinears), tmp_path / "m.safetensors")
    loadfsm.load(model, path, device="cpu", trace=tmp_path / "t.jsonl")
    events = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    # 5 arrivals (one per tensor) + complete, quantize, finalize for each of 3 layers
    assert sum(e["event"] == "layer_transition" for e in events) == 5 + 3 * 3
    assert events[-1]["event"] == "load_complete"
    assert {"layer", "src", "dst", "trigger", "bytes", "t"} <= events[0].keys()


def test_no_trace_emits_no_transition_events(tmp_path):
    """Without trace=, the load logs nothing per transition."""
    model = meta_model(NormAndLinears)
    path = write(random_state(NormAndLinears), tmp_path / "m.safetensors")
    with capture_logs() as logs:
        loadfsm.load(model, path, device="cpu")
    assert logs == []


def test_report_figures(tmp_path):
    """The report's bytes add up: final = sum of kept tensors; largest = biggest staging."""
    state = random_state(NormAndLinears)
    model = meta_model(NormAndLinears)
    report = loadfsm.load(model, write(state, tmp_path / "m.safetensors"), device="cpu")
    total = sum(t.numel() * t.element_size() for t in state.values())
    assert report.final_bytes == total
    assert report.largest_layer_bytes == 128 * 64 * 2 + 64 * 2
    assert report.peak_bytes <= report.final_bytes + report.largest_layer_bytes
    assert report.bytes_read == total and report.seconds > 0


# -- bad input -------------------------------------------------------------------------
def _load(state, tmp_path, **kwargs):
    return loadfsm.load(meta_model(NormAndLinears), write(state, tmp_path / "m.safetensors"),
                        device="cpu", **kwargs)


def test_unknown_tensor_raises_with_its_name(tmp_path):
    """An unexpected checkpoint tensor raises UnexpectedWeightError naming it and the file."""
    state = random_state(NormAndLinears) | {"extra.weight": torch.zeros(2)}
    with pytest.raises(loadfsm.UnexpectedWeightError, match="extra.weight") as err:
        _load(state, tmp_path)
    assert err.value.names == ["extra.weight"] and err.value.file.endswith("m.safetensors")


def test_missing_tensor_raises_listing_layer_and_name(tmp_path):
    """A missing tensor raises IncompleteLoadError listing the layer and the tensor."""
    state = random_state(NormAndLinears)
    del state["down.bias"]
    with pytest.raises(loadfsm.IncompleteLoadError, match="down: missing down.bias") as err:
        _load(state, tmp_path)
    assert err.value.missing == {"down": ["down.bias"]}


def test_wrong_shape_raises_before_reading(tmp_path):
    """A tensor of the wrong shape raises ShapeMismatchError naming tensor, file and layer."""
    state = random_state(NormAndLinears)
    state["up.weight"] = state["up.weight"][:100]
    with pytest.raises(loadfsm.ShapeMismatchError, match=r"up.weight.*\(128, 64\)") as err:
        _load(state, tmp_path)
    assert err.value.layer == "up" and err.value.file.endswith("m.safetensors")


def test_wrong_dtype_raises(tmp_path):
    """An integer tensor for a float parameter raises DtypeMismatchError."""
    state = random_state(NormAndLinears)
    state["norm.weight"] = torch.ones(64, dtype=torch.int32)
    with pytest.raises(loadfsm.DtypeMismatchError, match="norm.weight"):
        _load(state, tmp_path)


@pytest.mark.parametrize("quant", [None, "fp8", "fp8-channel"], ids=["bf16", "fp8", "fp8ch"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weight_raises_naming_tensor(tmp_path, quant, bad):
    """NaN or Inf in a weight raises NonFiniteWeightError naming tensor, file and layer."""
    state = random_state(NormAndLinears)
    state["up.weight"][3, 5] = bad
    with pytest.raises(loadfsm.NonFiniteWeightError, match="up.weight") as err:
        _load(state, tmp_path, quant=quant)
    assert err.value.layer == "up"


def test_duplicate_piece_from_iterator_raises(tmp_path):
    """The same tensor arriving twice raises DuplicateWeightError naming it."""
    state = random_state(FusedQKVModel)
    stream = [("q_proj.weight", state["q_proj.weight"])] * 2
    with pytest.raises(loadfsm.DuplicateWeightError, match="q_proj.weight"):
        loadfsm.load(meta_model(FusedQKVModel), stream, device="cpu")


def test_corrupt_file_raises(tmp_path):
    """A file that is not safetensors raises CorruptCheckpointError naming the file."""
    bad = tmp_path / "m.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(loadfsm.CorruptCheckpointError, match="m.safetensors"):
        loadfsm.load(meta_model(NormAndLinears), bad, device="cpu")


def test_truncated_file_raises(tmp_path):
    """A truncated shard raises CorruptCheckpointError naming the file."""
    path = write(random_state(NormAndLinears), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(loadfsm.CorruptCheckpointError, match="m.safetensors"):
        loadfsm.load(meta_model(NormAndLinears), path, device="cpu")


def test_non_strict_reports_missing_and_unexpected(tmp_path):
    """strict=False returns missing and unexpected names; the incomplete layer stays PARTIAL-free."""
    state = random_state(NormAndLinears) | {"zzz": torch.zeros(1)}
    del state["down.bias"]
    model = meta_model(NormAndLinears)
    report = loadfsm.load(model, write(state, tmp_path / "m.safetensors"), device="cpu",
                          strict=False)
    assert report.missing == {"down": ["down.bias"]} and report.unexpected == ["zzz"]
    assert report.layer_states["down"] == "META" and model.down.weight.is_meta
    assert report.layer_states["up"] == "FINALIZED"


def test_nan_found_before_the_whole_model_is_read(tmp_path, monkeypatch):
    """With a small verification batch, a NaN in the first layers stops the load early."""
    import loadfsm.loading.finiteness as session_module
    from loadfsm.testing import build_model, reference_state_dict
    monkeypatch.setattr(session_module, "COMMIT_BYTES", 1)
    state = reference_state_dict("tiny")
    state["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    model = build_model("tiny")
    with pytest.raises(loadfsm.NonFiniteWeightError, match="up_proj") as err:
        loadfsm.load(model, state.items(), quant="fp8", device="cpu")
    assert err.value.layer == "model.layers.0.mlp.gate_up_proj"
    assert model.lm_head.weight.is_meta          # never reached


def test_bf16_tensor_into_an_fp8_parameter_raises(tmp_path):
    """A float tensor for an FP8 parameter is refused: casting without scales corrupts it."""
    state = random_state(NormAndLinears)
    model = meta_model(NormAndLinears)
    model.up.weight = torch.nn.Parameter(torch.empty(128, 64, dtype=torch.float8_e4m3fn,
                                                     device="meta"), requires_grad=False)
    with pytest.raises(loadfsm.DtypeMismatchError, match="up.weight"):
        loadfsm.load(model, write(state, tmp_path / "m.safetensors"), device="cpu")


def test_pieces_given_as_an_iterator_are_planned():
    """``LoadSession(pieces=...)`` takes a one-shot iterator as it takes a list."""
    pieces = [Piece("mlp.up.weight", "up.weight")]
    session = loadfsm.LoadSession(meta_model(NormAndLinears), device="cpu", pieces=iter(pieces))
    assert "mlp.up.weight" in session.plan.by_ckpt and "up.weight" not in session.plan.by_ckpt
