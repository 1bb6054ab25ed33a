"""The watchdog names the layers in flight and the exact pieces a stuck load or push awaits."""

import threading
import time

import pytest
from structlog.testing import capture_logs

import loadfsm
from loadfsm.testing import build_model, reference_state_dict
from loadfsm.reload.transport import STALL_WARNING_S, WeightReceiver
from loadfsm.watchdog import Watchdog
from tiny_models import SMALL

QKV = "model.layers.0.self_attn.qkv_proj"
QKV_PIECES = [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
TICK = 0.02            # watchdog timeout in the tests; nothing asserts on elapsed time


def _stalls_after(items, captured, event, give_up_s=60):
    """Yield ``items``, then block until the watchdog has logged ``event``; then stop."""
    yield from items
    deadline = time.monotonic() + give_up_s          # a hang guard, not a threshold
    while not any(e["event"] == event for e in captured):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {event} warning")
        time.sleep(TICK / 4)


def _stalled(captured, event):
    return next(e for e in captured if e["event"] == event)


def _loaded():
    model = build_model(SMALL)
    loadfsm.load(model, reference_state_dict(SMALL).items(), quant="fp8", device="cpu")
    return model


def test_stuck_load_names_the_pieces_still_due():
    """A load stuck after one of qkv's three pieces: the warning lists qkv and the two
    pieces it waits for."""
    state = reference_state_dict(SMALL)
    first = [(n, state[n]) for n in ("model.embed_tokens.weight", QKV_PIECES[0])]
    with capture_logs() as captured:
        with pytest.raises(loadfsm.LoadError):         # the stream ends short: incomplete
            loadfsm.load(build_model(SMALL), _stalls_after(first, captured, "load_stalled"),
                         quant="fp8", device="cpu", watchdog=TICK)
    warning = _stalled(captured, "load_stalled")
    assert warning["log_level"] == "warning"
    assert warning["layers_in_flight"] == [QKV]
    assert warning["waiting_for"] == {QKV: QKV_PIECES[1:]}
    assert warning["arrivals"] == 2


def test_stuck_push_lists_reloaded_layers():
    """A push stuck mid-layer lists that layer's missing pieces; untouched layers are not
    named; the push then fails and rolls back."""
    sync = loadfsm.WeightSync(_loaded())
    state = reference_state_dict(SMALL, 1)
    with capture_logs() as captured:
        with Watchdog(sync.session, TICK, "push") as dog:
            with pytest.raises(loadfsm.PushError):
                sync.push(_stalls_after([(QKV_PIECES[1], state[QKV_PIECES[1]])], captured,
                                        "push_stalled"))
    warning = _stalled(captured, "push_stalled")
    assert warning["waiting_for"] == {QKV: [QKV_PIECES[0], QKV_PIECES[2]]}
    assert dog.warnings >= 1


def test_push_without_a_waiting_layer_is_not_stalled():
    """Before a push's first tensor (the engine waits for the trainer) and after its last
    (it commits), no layer waits for a piece: no warning."""
    sync = loadfsm.WeightSync(_loaded())
    state = reference_state_dict(SMALL, 1)

    def late():
        for _ in range(20):           # four of the dog's timeouts, polled 16 times
            time.sleep(TICK)
        yield from ((name, state[name]) for name in QKV_PIECES)

    # The timeout stays above a pause inside the push (the first arrival after a
    # re-plan may run a full garbage collection): the layer begun never waits that long.
    with capture_logs() as captured:
        with Watchdog(sync.session, TICK * 5, "push"):
            sync.push(late())
    assert not [e for e in captured if e["event"] == "push_stalled"]


def test_off_means_no_thread():
    """timeout None: no watchdog thread runs during the load."""
    seen = []

    def stream():
        for item in reference_state_dict(SMALL).items():
            seen.extend(t.name for t in threading.enumerate())
            yield item

    loadfsm.load(build_model(SMALL), stream(), quant="fp8", device="cpu")
    assert not [name for name in seen if "watchdog" in name]


def test_receiver_watchdog_is_on_by_default(monkeypatch):
    """A WeightReceiver watches its pushes unless told not to; a stall is reported."""
    sync = loadfsm.WeightSync(_loaded())
    assert WeightReceiver(sync).stall_warning_s == STALL_WARNING_S > 0
    state = reference_state_dict(SMALL, 1)
    receiver = WeightReceiver(sync, stall_warning_s=TICK)
    with capture_logs() as captured:
        monkeypatch.setattr(receiver, "arrivals", lambda: _stalls_after(
            [(QKV_PIECES[2], state[QKV_PIECES[2]])], captured, "push_stalled"))
        with pytest.raises(loadfsm.PushError):
            receiver.receive()
    assert _stalled(captured, "push_stalled")["waiting_for"] == {QKV: sorted(QKV_PIECES[:2])}


def test_bad_arguments_are_refused():
    """An unknown kind or a negative timeout raises ValueError."""
    session = loadfsm.LoadSession(build_model(SMALL), device="cpu")
    with pytest.raises(ValueError):
        Watchdog(session, 1.0, "reload")
    with pytest.raises(ValueError):
        Watchdog(session, -1.0)
