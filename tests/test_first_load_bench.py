"""``benchmarks/first_load.py``'s pieces that can go wrong without a GPU: the checkpoint it
writes (read bit for bit by loadfsm.hf and by transformers), its refusal to write over other
files, a child's result line, and the figures made of rounds. Nothing here is timed."""

import argparse
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: E402

import loadfsm.hf  # noqa: E402
from loadfsm.testing import write_checkpoint  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import first_load  # noqa: E402
import first_load_child  # noqa: E402
from hf_checkpoint import cached, llama_8b_config, write_hf_checkpoint  # noqa: E402

SMALL = llama_8b_config(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=96)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_hf_checkpoint(SMALL, tmp_path_factory.mktemp("hf") / "ckpt",
                               max_shard_bytes=20_000)


def _written(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_checkpoint_loads_bit_identical_through_loadfsm_hf(checkpoint):
    """loadfsm.hf builds a Llama of the asked shapes and loads every written tensor exactly."""
    model, report = loadfsm.hf.from_pretrained(checkpoint, quant=None, device="cpu",
                                               dtype=torch.bfloat16)
    assert isinstance(model, LlamaForCausalLM)
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (2, 64)
    params, written = dict(model.named_parameters()), _written(checkpoint)
    assert len(list(checkpoint.glob("*.safetensors"))) > 1
    assert params.keys() == written.keys()
    for name, tensor in written.items():
        assert torch.equal(params[name], tensor), name


def test_checkpoint_loads_bit_identical_through_transformers(checkpoint):
    """transformers' own from_pretrained reads the hand-written config.json and the shards."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    state = model.state_dict()
    assert model.config.num_key_value_heads == 2
    for name, tensor in _written(checkpoint).items():
        assert torch.equal(state[name], tensor), name


def test_cached_checkpoint_reused_only_for_its_shapes(checkpoint, tmp_path):
    """A directory of the same shapes is reused; other shapes or stray files are refused."""
    assert cached(SMALL, checkpoint)
    assert not cached(SMALL, tmp_path / "absent")
    with pytest.raises(ValueError, match="num_hidden_layers"):
        cached(llama_8b_config(layers=3, hidden=64, intermediate=128, heads=4, kv_heads=2,
                               vocab=96), checkpoint)
    (tmp_path / "stray.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="no config.json"):
        cached(SMALL, tmp_path)


def test_write_checkpoint_dir_of_the_same_shapes_is_adopted(tmp_path):
    """A ``write_checkpoint`` directory (no config.json) of the asked tensors gets its
    config.json and loads; one of other shapes is refused and left as it was."""
    plain = write_checkpoint(SMALL, tmp_path / "plain", max_shard_bytes=20_000)
    assert cached(SMALL, plain)
    model, _ = loadfsm.hf.from_pretrained(plain, quant=None, device="cpu")
    assert torch.equal(model.lm_head.weight, _written(plain)["lm_head.weight"])
    other = write_checkpoint(llama_8b_config(layers=2, hidden=64, intermediate=64, heads=4,
                                             kv_heads=2, vocab=96), tmp_path / "other")
    with pytest.raises(ValueError, match="other tensors.*mlp"):
        cached(SMALL, other)
    assert not (other / "config.json").exists()


def test_parse_result_takes_the_last_line_of_its_side():
    """Library output and other JSON before the result line are skipped."""
    stdout = '\n'.join(['Loading weights', '{"side": "floor", "x": 1}', '{not json',
                        '{"side": "loadfsm", "x": 2}', 'a warning'])
    assert first_load.parse_result("loadfsm", stdout)["x"] == 2
    with pytest.raises(first_load.ChildFailed, match="transformers: no result line"):
        first_load.parse_result("transformers", stdout)


def _round(floor, first, warm, theirs):
    load = lambda s, peak: {"load_s": s, "since_spawn_s": s + floor, "peak_bytes": peak,  # noqa: E731
                            "model_bytes": 10, "fp8_tensors": 14}
    return {"floor": {"side": "floor", "since_spawn_s": floor},
            "loadfsm": {"side": "loadfsm", "first": load(first, 9), "warm": load(warm, 8)},
            "transformers": {"side": "transformers", "first": load(theirs, 12)}}


def test_summary_takes_medians_largest_peaks_and_ratios():
    """Seconds are medians over rounds, peaks the largest, ratios made of those."""
    rounds = [_round(2.0, 1.0, 0.5, 6.0), _round(4.0, 3.0, 0.5, 6.0), _round(3.0, 2.0, 1.0, 9.0)]
    rounds[1]["loadfsm"]["first"]["peak_bytes"] = 11
    r = first_load.summarize(rounds)
    assert r["loadfsm"]["first"]["load_s"] == 2.0
    assert r["loadfsm"]["first"]["peak_bytes"] == 11
    assert r["loadfsm"]["first"]["beyond_floor_s"] == 5.0 - 3.0
    assert r["ratios"]["transformers_over_loadfsm_load"] == 3.0
    assert r["ratios"]["loadfsm_first_over_warm_load"] == 4.0
    assert r["ratios"]["transformers_over_loadfsm_beyond_floor"] == (10.0 - 3.0) / (5.0 - 3.0)
    assert r["ratios"]["loadfsm_peak_over_transformers_peak"] == 11 / 12
    assert "| loadfsm first | 2.000 |" in first_load.format_result(
        {**r, "model": "m", "device": "cpu", "quant": "fp8", "checkpoint_bytes": 1,
         "shards": 1, "jit_cache": "warm", "repeat": 3,
         "versions": {"torch": "t", "transformers": "x"}})


def test_summary_of_an_unavailable_side_says_why_and_gives_no_ratio():
    """transformers unavailable in any round: its reason stays, its ratios are None."""
    rounds = [_round(2.0, 1.0, 0.5, 6.0), _round(2.0, 1.0, 0.5, 6.0)]
    rounds[1]["transformers"] = {"side": "transformers", "unavailable": "RuntimeError: no GPU"}
    r = first_load.summarize(rounds)
    assert r["transformers"] == {"unavailable": "RuntimeError: no GPU"}
    assert r["ratios"]["transformers_over_loadfsm_load"] is None
    assert r["ratios"]["loadfsm_first_over_warm_load"] == 2.0


def test_transformers_side_reports_why_it_cannot_load(tmp_path):
    """A load transformers refuses gives 'unavailable: <type>: <reason>', not a crash."""
    args = argparse.Namespace(dir=str(tmp_path), device="cpu", quant="fp8", spawned_at=0.0)
    result = first_load_child.transformers_side(args)
    assert set(result) == {"unavailable"}
    assert result["unavailable"].split(":")[0].endswith(("Error", "Exception"))


def test_loadfsm_child_prints_first_and_warm_loads(checkpoint):
    """The loadfsm side, in its own process, loads to FP8 twice and prints one result line."""
    args = argparse.Namespace(device="cpu", quant="fp8", child_timeout=120.0)
    result, _ = first_load.spawn("loadfsm", checkpoint, args, extra=("--warm",))
    first, warm = result["first"], result["warm"]
    assert first["fp8_tensors"] == warm["fp8_tensors"] == 2 * 7   # 7 linears a layer
    assert first["model_bytes"] == warm["model_bytes"] > 0
    assert first["peak_bytes"] is None                            # measured on CUDA only
    assert 0 < first["load_s"] <= first["since_start_s"] <= first["since_spawn_s"]
