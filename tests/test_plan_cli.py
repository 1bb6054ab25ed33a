"""`loadfsm plan`: a dry run from the headers whose figures match the real load."""

import json

import pytest
import torch
from safetensors.torch import save_file

import loadfsm
from loadfsm.cli import main as cli_main
from loadfsm.testing import build_model, reference_state_dict
from loadfsm.plan_cli import plan_checkpoint
from loadfsm.sources.shard_file import ShardFile

GONE = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "ok"
    path.mkdir()
    save_file(reference_state_dict("tiny"), str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="module")
def gappy(tmp_path_factory):
    """One tensor missing, one stray."""
    path = tmp_path_factory.mktemp("plan") / "gappy"
    path.mkdir()
    state = reference_state_dict("tiny")
    del state[GONE]
    state["stray.weight"] = torch.zeros(3)
    save_file(state, str(path / "model.safetensors"))
    return path


@pytest.fixture
def no_data_reads(monkeypatch):
    """Every path that reads tensor bytes raises: a plan may read headers only."""
    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read")
    for name in ("read_into", "read_range", "_pread"):
        monkeypatch.setattr(ShardFile, name, refuse)


@pytest.mark.parametrize("quant", ["fp8", "fp8-block", None], ids=["fp8", "fp8-block", "bf16"])
def test_figures_match_the_real_load(checkpoint, quant):
    """Bytes to read, final size and largest layer equal the load's own report."""
    plan = plan_checkpoint(checkpoint, model="tiny", quant=quant)
    report = loadfsm.load(build_model("tiny"), checkpoint, quant=quant, device="cpu")
    assert plan.bytes_to_read == report.bytes_read
    assert plan.final_bytes == report.final_bytes
    assert plan.largest_layer_bytes == report.largest_layer_bytes
    assert plan.memory_bound_bytes == report.final_bytes + report.largest_layer_bytes
    assert report.peak_bytes <= plan.memory_bound_bytes
    assert len(plan.layers) == sum(report.states.values())


def test_reads_no_tensor_data(checkpoint, no_data_reads):
    """With every data read refused, the plan still completes (and a load would not)."""
    plan = plan_checkpoint(checkpoint, model="tiny")
    assert plan.final_bytes > 0
    with pytest.raises(AssertionError, match="tensor data was read"):
        loadfsm.load(build_model("tiny"), checkpoint, quant="fp8", device="cpu")


def test_lists_missing_and_unexpected(gappy, no_data_reads, capsys):
    """The gap is named per layer, the stray tensor listed; exit 1; --json agrees."""
    assert cli_main(["plan", str(gappy), "--model", "tiny"]) == 1
    text = capsys.readouterr().out
    assert f"missing: model.layers.1.mlp.gate_up_proj: {GONE}" in text
    assert "unexpected: stray.weight" in text
    assert cli_main(["plan", str(gappy), "--model", "tiny", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["missing"] == {"model.layers.1.mlp.gate_up_proj": [GONE]}
    assert data["unexpected"] == ["stray.weight"]
    layer = next(l for l in data["layers"] if l["name"] == "model.layers.1.mlp.gate_up_proj")
    assert (layer["in_checkpoint"], layer["pieces"], layer["final_bytes"]) == (1, 2, 0)


def test_table_shows_pieces_per_layer(checkpoint, capsys):
    """The table has one row per layer up to --top, with pieces present/expected."""
    assert cli_main(["plan", str(checkpoint), "--model", "tiny", "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("model.") or line.startswith("lm_head")]
    assert len(rows) == 3
    assert any("2/2" in row for row in lines if "gate_up_proj" in row)
    assert lines[-1].startswith("memory bound (final + largest layer):")


def test_hf_checkpoint(tmp_path, no_data_reads, monkeypatch):
    """--hf builds the transformers model from config.json; figures match from_pretrained."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=256, intermediate_size=128,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(
        tmp_path, max_shard_size="100KB")
    plan = plan_checkpoint(tmp_path, hf=True, quant="fp8")
    assert not plan.missing and not plan.unexpected
    monkeypatch.undo()                    # now the real load may read
    import loadfsm.hf
    _, report = loadfsm.hf.from_pretrained(tmp_path, quant="fp8", device="cpu")
    assert plan.bytes_to_read == report.bytes_read
    assert plan.final_bytes == report.final_bytes
    assert plan.largest_layer_bytes == report.largest_layer_bytes
