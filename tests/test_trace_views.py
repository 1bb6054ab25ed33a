"""`loadfsm trace --perfetto / --plot`: the trace as a Perfetto timeline and a picture."""

import json
import os
import struct
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import loadfsm
from loadfsm.cli import main as cli_main
from loadfsm.testing import CONFIGS, build_model, reference_state_dict
from loadfsm.trace_export import trace_events
from loadfsm.trace_timeline import read_events

# Tied and padded, so the trace has every instant-event kind a clean load makes.
CONFIG = replace(CONFIGS["tiny"], tie_embeddings=True, vocab_size=4000, pad_vocab_to=64,
                 num_layers=2)
ORDER = ["PARTIAL", "COMPLETE", "QUANTIZED", "FINALIZED"]
NAN_TENSOR = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def load_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("views") / "load.jsonl"
    loadfsm.load(build_model(CONFIG), reference_state_dict(CONFIG).items(), quant="fp8",
                 device="cpu", trace=path)
    return path


@pytest.fixture(scope="module")
def push_trace(tmp_path_factory):
    """One push that commits, then one that rolls back at a NaN (commit per layer)."""
    model = build_model(CONFIG)
    loadfsm.load(model, reference_state_dict(CONFIG).items(), quant="fp8", device="cpu")
    path = tmp_path_factory.mktemp("views") / "push.jsonl"
    sync = loadfsm.WeightSync(model, trace=path, commit_bytes=1)
    state = reference_state_dict(CONFIG, 1)
    sync.push(state.items())
    state[NAN_TENSOR] = torch.full_like(state[NAN_TENSOR], float("nan"))
    with pytest.raises(loadfsm.PushError):
        sync.push(state.items())
    sync.close()
    return path


def _perfetto(trace, tmp_path):
    out = tmp_path / "out.json"
    cli_main(["trace", str(trace), "--perfetto", str(out)])
    return json.loads(out.read_text())["traceEvents"]


def _tracks(events):
    return {e["args"]["name"]: e["tid"] for e in events
            if e["ph"] == "M" and e["name"] == "thread_name"}


def _slices(events, tid):
    return [e for e in events if e["ph"] == "X" and e["tid"] == tid]


def test_one_track_per_layer_with_a_slice_per_state(load_trace, tmp_path):
    """Every layer of the load has its own track whose slices run PARTIAL..FINALIZED."""
    events = _perfetto(load_trace, tmp_path)
    tracks = _tracks(events)
    layers = loadfsm.LoadSession(build_model(CONFIG), device="cpu").plan.layers
    assert set(tracks) == set(layers)
    assert len(set(tracks.values())) == len(tracks)
    for layer, tid in tracks.items():
        slices = _slices(events, tid)
        names = [s["name"] for s in slices]
        # a layer whose pieces all default skips PARTIAL
        assert names in (ORDER, ORDER[1:]), (layer, names)
        for a, b in zip(slices, slices[1:]):
            assert a["dur"] >= 0 and a["ts"] + a["dur"] <= b["ts"] + 1e-3


def test_memory_counters_match_the_report(load_trace, tmp_path):
    """The ledger counter ends at the final bytes; total is staging + final throughout and
    never above the report's peak (sampled at transitions; the peak also sees a layer's
    output before its staging is freed); the floor is final + largest layer."""
    events = _perfetto(load_trace, tmp_path)
    done = next(e for e in read_events(load_trace) if e["event"] == "load_complete")
    ledger = [e for e in events if e["ph"] == "C" and e["name"].startswith("ledger")]
    assert ledger and all(c["args"]["total"] == c["args"]["staging"] + c["args"]["final"]
                          for c in ledger)
    assert ledger[-1]["args"]["final"] == done["final_bytes"]
    assert max(c["args"]["total"] for c in ledger) <= done["peak_bytes"]
    floor = {c["args"]["floor"] for c in events if c["ph"] == "C" and "floor" in c["name"]}
    assert floor == {done["final_bytes"] + done["largest_layer_bytes"]}


def test_instant_events_for_defaults_padding_and_ties(load_trace, tmp_path):
    """Defaults and padding land on their layer's track; the tie on its canonical layer."""
    events = _perfetto(load_trace, tmp_path)
    tracks = _tracks(events)
    instants = {(e["name"], e["tid"]) for e in events if e["ph"] == "i"}
    assert ("padding", tracks["model.embed_tokens"]) in instants
    assert ("tied weight", tracks["model.embed_tokens"]) in instants
    assert ("defaults", tracks["model.layers.0.self_attn.attn"]) in instants


def test_push_reload_and_rollback_are_named_apart(push_trace, tmp_path):
    """Reload states are `reload <STATE>`; a rollback returns to `FINALIZED (rolled back)`,
    coloured as an error; the failure is an instant event on the layer it names."""
    events = _perfetto(push_trace, tmp_path)
    tracks = _tracks(events)
    names = [s["name"] for s in _slices(events, tracks["model.layers.1.mlp.down_proj"])]
    assert names[:5] == ["reload META", "reload PARTIAL", "reload COMPLETE",
                         "reload QUANTIZED", "FINALIZED"]
    assert names[-1] == "FINALIZED (rolled back)"
    rolled = [s for s in _slices(events, tracks["model.layers.1.mlp.down_proj"])
              if s["name"] == "FINALIZED (rolled back)"]
    assert rolled[0]["cname"] == "terrible"
    failed = [e for e in events if e["ph"] == "i" and e["name"] == "push failed"]
    assert len(failed) == 1 and failed[0]["tid"] == tracks["model.layers.1.mlp.down_proj"]
    assert failed[0]["cname"] == "terrible"
    assert failed[0]["args"]["tensor"] == NAN_TENSOR
    committed = [e["args"]["committed"] for e in events
                 if e["ph"] == "C" and e["name"] == "push: bytes committed"]
    assert committed == sorted(committed) and committed[-1] > 0


def test_every_event_has_the_format_fields(load_trace, push_trace):
    """Each event carries what the trace-event format requires for its phase."""
    required = {"M": {"name", "pid", "args"}, "X": {"name", "pid", "tid", "ts", "dur"},
                "C": {"name", "pid", "ts", "args"}, "i": {"name", "pid", "tid", "ts", "s"}}
    for trace in (load_trace, push_trace):
        data = trace_events(read_events(trace))
        json.dumps(data, allow_nan=False)                  # plain JSON, no NaN
        for event in data["traceEvents"]:
            assert required[event["ph"]] <= set(event), event
            if event["ph"] == "C":
                assert all(isinstance(v, (int, float)) for v in event["args"].values())


def test_perfetto_trace_processor_reads_it(push_trace, tmp_path):
    """Perfetto's own trace processor imports the file: slices and thread names agree."""
    tp_module = pytest.importorskip("perfetto.trace_processor")
    events = _perfetto(push_trace, tmp_path)
    try:
        tp = tp_module.TraceProcessor(trace=str(tmp_path / "out.json"))
    except Exception as exc:          # noqa: BLE001 - no trace_processor binary here
        pytest.skip(f"perfetto trace processor unavailable: {exc}")
    try:
        count = next(iter(tp.query("select count(*) as n from slice"))).n
        threads = {row.name for row in tp.query("select name from thread")}
    finally:
        tp.close()
    assert count == sum(e["ph"] in ("X", "i") and e.get("s") != "g" for e in events)
    assert set(_tracks(events)) <= threads


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_plot_of_a_load_without_a_display(load_trace, tmp_path):
    """--plot writes a PNG of the expected size (memory + lifecycle panels) with no display
    and without pyplot (an interactive MPLBACKEND is never touched)."""
    out = tmp_path / "load.png"
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    env["MPLBACKEND"] = "TkAgg"
    code = ("import sys; from loadfsm.cli import main; "
            f"rc = main(['trace', {str(load_trace)!r}, '--plot', {str(out)!r}]); "
            "assert 'matplotlib.pyplot' not in sys.modules; sys.exit(rc)")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    assert _png_size(out) == (800, 510)


def test_plot_of_a_push_adds_the_committed_panel(push_trace, tmp_path):
    """A trace with pushes gets a third panel (bytes committed, the rollback): taller."""
    out = tmp_path / "push.png"
    assert cli_main(["trace", str(push_trace), "--plot", str(out)]) == 1   # a push failed
    assert _png_size(out) == (800, 690)


def test_plot_without_matplotlib_says_which_extra(load_trace, tmp_path, monkeypatch):
    """Without matplotlib, --plot raises ImportError naming the [plot] extra."""
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    from loadfsm.trace_plot import write_plot
    with pytest.raises(ImportError, match=r"loadfsm\[plot\]"):
        write_plot(load_trace, tmp_path / "x.png")


def test_plot_lines_are_the_reports_figures(tmp_path):
    """The plot's naive peak is the demo's, and its floor is final + largest layer."""
    from loadfsm.trace_timeline import floor_bytes, naive_peak, naive_peak_bytes, timeline
    path = tmp_path / "t.jsonl"
    report = loadfsm.load(build_model(CONFIG), reference_state_dict(CONFIG).items(),
                          quant="fp8", device="cpu", trace=path)
    tl = timeline(read_events(path))
    assert naive_peak_bytes(tl) == naive_peak(report) > report.peak_bytes
    assert floor_bytes(tl) == report.final_bytes + report.largest_layer_bytes
