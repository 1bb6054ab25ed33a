"""`loadfsm trace FILE` points at the cause: defaults, padding, ties, gaps, layers in flight."""

import contextlib
import io
import json
from dataclasses import replace

import pytest
import torch

import loadfsm
from loadfsm.cli import main as cli_main
from loadfsm.testing import CONFIGS, build_model, reference_state_dict
from tiny_models import SMALL, round_robin

# Tied and padded at once; its checkpoint carries no kv-cache scales.
CONFIG = replace(CONFIGS["tiny"], tie_embeddings=True, vocab_size=4000, pad_vocab_to=64)
GONE = "model.layers.1.mlp.up_proj.weight"
GONE_LAYER = "model.layers.1.mlp.gate_up_proj"


@pytest.fixture(scope="module")
def troubled_trace(tmp_path_factory):
    """A non-strict interleaved load that misses one tensor and carries one extra."""
    state = reference_state_dict(CONFIG)
    stream = [(k, v) for k, v in round_robin(CONFIG, state) if k != GONE]
    path = tmp_path_factory.mktemp("trace") / "trace.jsonl"
    loadfsm.load(build_model(CONFIG), stream + [("stray.weight", state[GONE])], quant="fp8",
                 device="cpu", strict=False, trace=path)
    return path


@pytest.fixture(scope="module")
def clean_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "clean.jsonl"
    loadfsm.load(build_model("tiny"), None, load_format="dummy", quant="fp8", device="cpu",
                 trace=path)
    return path


@pytest.fixture(scope="module")
def troubled(troubled_trace):
    """(exit code, printed summary) of `loadfsm trace` on the troubled load."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_main(["trace", str(troubled_trace)])
    return code, out.getvalue()


def _section(text, title):
    """The indented lines under ``title:`` in the summary."""
    lines = text.splitlines()
    start = lines.index(title + ":") + 1
    body = []
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        body.append(line.strip())
    return body


def test_names_defaulted_layers(troubled):
    """Every attention layer that took default kv scales is listed with its scales."""
    _, text = troubled
    body = _section(text, "given defaults")
    for i in range(CONFIG.num_layers):
        line = next(b for b in body if b.startswith(f"model.layers.{i}.self_attn.attn:"))
        assert f"model.layers.{i}.self_attn.k_scale" in line


def test_names_padded_tensors(troubled):
    """The padded embedding is listed under the zero-filled tensors."""
    _, text = troubled
    assert _section(text, "padded (zero-filled)") == [
        "model.embed_tokens: model.embed_tokens.weight"]


def test_names_tied_aliases(troubled):
    """The tied alias and its canonical tensor are named."""
    _, text = troubled
    assert "tied: lm_head.weight -> model.embed_tokens.weight" in text


def test_names_incomplete_layers_and_what_they_miss(troubled):
    """A layer that never FINALIZED is listed with its last state and its missing pieces."""
    _, text = troubled
    assert _section(text, "never FINALIZED") == [f"{GONE_LAYER} (left PARTIAL): missing {GONE}"]


def test_names_unexpected_tensors(troubled):
    """Unexpected tensors of a non-strict load are named."""
    _, text = troubled
    assert "unexpected tensors: stray.weight" in text


def test_shows_the_in_flight_warning(troubled):
    """The layers-in-flight warning appears once, with the layers and the MB of staging."""
    _, text = troubled
    warnings = [line for line in text.splitlines() if "layers in flight" in line]
    assert len(warnings) == 1
    assert "limit 2" in warnings[0] and "MB staging" in warnings[0]
    assert "model.layers.0.self_attn.qkv_proj" in warnings[0]


def test_shows_slowest_layers(troubled):
    """The slowest layers are listed with their times, at most --top of them."""
    _, text = troubled
    body = _section(text, "slowest layers")
    assert 0 < len(body) <= 5 and all(line.endswith(" ms") for line in body)


def test_exit_code_is_1_when_a_layer_never_finalized(troubled):
    """The command fails (exit 1) when a layer never reached FINALIZED."""
    code, _ = troubled
    assert code == 1


def test_exit_code_is_0_for_a_clean_load(clean_trace, capsys):
    """Every layer FINALIZED: exit 0, and no section about trouble."""
    assert cli_main(["trace", str(clean_trace)]) == 0
    text = capsys.readouterr().out
    assert "never FINALIZED" not in text and "warning:" not in text
    assert "given defaults:" in text      # tiny's attention layers still take default scales


def test_json_output_carries_the_same_facts(troubled_trace, capsys):
    """--json prints the summary as one object with the same facts."""
    assert cli_main(["trace", str(troubled_trace), "--json"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["missing"] == {GONE_LAYER: [GONE]}
    assert summary["not_finalized"] == {GONE_LAYER: "PARTIAL"}
    assert summary["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert summary["padded"] == {"model.embed_tokens": ["model.embed_tokens.weight"]}
    assert len(summary["in_flight_warnings"]) == 1


# -- failures (issue 15): a failed or cut-off load or push exits 1 ------------------------
NAN_TENSOR = "model.layers.1.self_attn.o_proj.weight"


def _run_trace(path, *extra):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_main(["trace", str(path), *extra])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def failed_load_trace(tmp_path_factory):
    """A load that raised at a NaN weight: its trace ends with ``load_failed``."""
    state = reference_state_dict(SMALL)
    state[NAN_TENSOR] = torch.full_like(state[NAN_TENSOR], float("nan"))
    path = tmp_path_factory.mktemp("trace") / "failed.jsonl"
    with pytest.raises(loadfsm.NonFiniteWeightError):
        loadfsm.load(build_model(SMALL), state.items(), quant="fp8", device="cpu", trace=path)
    return path


@pytest.fixture(scope="module")
def push_traces(tmp_path_factory):
    """(good push, failed push) traces: the second push lacks one of qkv_proj's pieces."""
    model = build_model(SMALL)
    loadfsm.load(model, reference_state_dict(SMALL).items(), quant="fp8", device="cpu")
    root = tmp_path_factory.mktemp("push")
    state = reference_state_dict(SMALL, 1)
    sync = loadfsm.WeightSync(model, trace=root / "good.jsonl")
    sync.push(state.items())
    sync.close()
    sync = loadfsm.WeightSync(model, trace=root / "bad.jsonl")
    with pytest.raises(loadfsm.PushError):
        sync.push((k, v) for k, v in state.items()
                  if k != "model.layers.1.self_attn.k_proj.weight")
    sync.close()
    return root / "good.jsonl", root / "bad.jsonl"


def test_failed_load_exits_1_and_names_the_error(failed_load_trace):
    """A trace ending in load_failed: exit 1, the error class, tensor and layer named."""
    code, text = _run_trace(failed_load_trace)
    assert code == 1
    line = next(line for line in text.splitlines() if line.startswith("FAILED (load_failed)"))
    assert "NonFiniteWeightError" in line and NAN_TENSOR in line
    assert "layer='model.layers.1.self_attn.o_proj'" in line


def test_failed_load_json_carries_the_failure(failed_load_trace):
    """--json: failed is true and the failure event's fields are kept."""
    code, text = _run_trace(failed_load_trace, "--json")
    summary = json.loads(text)
    assert code == 1 and summary["failed"] is True and summary["ok"] is False
    (failure,) = summary["failures"]
    assert failure["event"] == "load_failed" and failure["tensor"] == NAN_TENSOR


def test_failed_push_lists_rollbacks_and_commits(push_traces):
    """A push that rolled back: exit 1, the rolled-back layer and the committed count."""
    code, text = _run_trace(push_traces[1])
    assert code == 1
    assert any(line.startswith("FAILED (push_failed): PushError") for line in text.splitlines())
    rolled = next(line for line in text.splitlines() if line.startswith("rolled back"))
    assert "model.layers.1.self_attn.qkv_proj" in rolled
    assert "committed before the failure:" in text


def test_good_push_exits_0(push_traces):
    """A push that completed: exit 0, counted, nothing failed."""
    code, text = _run_trace(push_traces[0])
    assert code == 0 and "pushes completed: 1" in text and "FAILED" not in text


def _lines(tmp_path, events):
    path = tmp_path / "hand.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def _move(layer, src, dst, trigger, t):
    return {"event": "layer_transition", "layer": layer, "src": src, "dst": dst,
            "trigger": trigger, "bytes": 8, "t": t}


def test_truncated_trace_exits_1(tmp_path):
    """A trace that stops after a transition (a crashed process) fails, even if every
    layer it names reached FINALIZED."""
    path = _lines(tmp_path, [_move("a", "META", "PARTIAL", "arrive", 0.1),
                             _move("a", "PARTIAL", "COMPLETE", "complete", 0.2),
                             _move("a", "COMPLETE", "QUANTIZED", "quantize", 0.3),
                             _move("a", "QUANTIZED", "FINALIZED", "finalize", 0.4)])
    code, text = _run_trace(path)
    assert code == 1 and "no load_complete or push_complete" in text
    assert json.loads(_run_trace(path, "--json")[1])["ended"] is False


def test_hand_written_push_failure_exits_1(tmp_path):
    """push_failed with its committed list, after a rollback transition: exit 1."""
    path = _lines(tmp_path, [
        _move("a", "FINALIZED", "META", "reload", 0.1),
        _move("b", "FINALIZED", "META", "reload", 0.2),
        _move("a", "META", "FINALIZED", "rollback", 0.3),
        {"event": "push_failed", "error": "PushError", "message": "boom", "tensor": "a.w",
         "file": None, "layer": "a", "committed": ["b"], "t": 0.4}])
    code, text = _run_trace(path)
    assert code == 1
    assert "FAILED (push_failed): PushError: boom [tensor=a.w, layer=a]" in text
    assert "committed before the failure: 1 layer(s): b" in text
    assert "rolled back (old weights kept): a" in text


def test_trace_file_holds_each_event_but_transitions_at_once(tmp_path):
    """Failures and other per-load events reach the file at once (with any transitions
    before them), so a process killed right after still leaves them on disk."""
    from loadfsm.trace import Tracer
    path = tmp_path / "t.jsonl"
    tracer = Tracer(path)
    tracer.transition("layer", "META", "PARTIAL", "arrive", 8)
    tracer.event("load_failed", error="X", message="m", tensor=None, file=None, layer="layer")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(e["event"], e["level"]) for e in lines] == [("layer_transition", "info"),
                                                         ("load_failed", "info")]
    tracer.close()
