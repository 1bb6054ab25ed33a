"""The loadfsm command: demo, load and trace as a user runs them."""

import json

from loadfsm.cli import main
from loadfsm.testing import write_checkpoint


def test_demo_json_has_the_figures(capsys):
    """`loadfsm demo --json` prints one JSON object with the documented keys."""
    assert main(["demo", "--json", "--device", "cpu"]) == 0
    figures = json.loads(capsys.readouterr().out)
    for key in ("peak_bytes", "final_bytes", "largest_layer_bytes", "naive_peak_bytes",
                "sqnr_db", "states", "seconds"):
        assert key in figures
    assert figures["states"]["FINALIZED"] > 0 and figures["states"]["PARTIAL"] == 0
    assert figures["peak_bytes"] < figures["naive_peak_bytes"]


def test_demo_text_names_peak_final_naive_and_sqnr(capsys):
    """`loadfsm demo` prints layers by state, the three memory figures, time and SQNR."""
    assert main(["demo", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for word in ("layers by state", "peak memory", "final model", "naive peak",
                 "load time", "SQNR"):
        assert word in out


def test_load_then_trace(tmp_path, capsys):
    """`loadfsm load --trace F` writes a trace that `loadfsm trace F` summarizes."""
    ckpt = write_checkpoint("tiny-moe", tmp_path / "ckpt", max_shard_bytes=8 << 20)
    trace = tmp_path / "t.jsonl"
    assert main(["load", str(ckpt), "--model", "tiny-moe", "--quant", "fp8-channel",
                 "--device", "cpu", "--trace", str(trace), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quant"] == "fp8-channel" and report["missing"] == {}
    assert main(["trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert f"FINALIZED={len(report['layer_states'])}" in out and "slowest layers" in out


def test_load_watchdog_option_reaches_load(tmp_path, monkeypatch, capsys):
    """`loadfsm load --watchdog S` passes S to `loadfsm.load`; off by default."""
    import loadfsm.api
    seen = []
    real = loadfsm.api.load

    def spy(*args, **kwargs):
        seen.append(kwargs["watchdog"])
        return real(*args, **kwargs)

    monkeypatch.setattr(loadfsm.api, "load", spy)
    ckpt = write_checkpoint("tiny", tmp_path / "ckpt")
    for extra in ([], ["--watchdog", "12.5"]):
        assert main(["load", str(ckpt), "--model", "tiny", "--device", "cpu", "--json",
                     *extra]) == 0
    assert seen == [None, 12.5]
