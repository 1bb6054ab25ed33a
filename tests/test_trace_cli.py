"""`loadfsm trace FILE` points at the cause: defaults, padding, ties, gaps, layers in flight."""

import contextlib
import io
import json
from dataclasses import replace

import pytest

import loadfsm
from loadfsm.cli import main as cli_main
from loadfsm.models import CONFIGS, build_model, reference_state_dict
from test_in_flight import round_robin

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
