"""Delta pushes: only layers whose quantized bytes changed travel; the engine ends bit for
bit where a full push of the same weights puts it."""

import pytest
import torch

import loadfsm
from loadfsm.quant.config import Fp8Config
from loadfsm.quant.push_fp8 import quantize_for_push
from loadfsm import DeltaPush
from loadfsm.testing import build_model, load_reference_model, reference_state_dict
from loadfsm.testing.fp8_checkpoint import write_fp8_checkpoint
from checks import addresses, assert_same_tensors, snapshot
from tiny_models import SMALL, SMALL_MOE

CONFIGS = {"tensor": Fp8Config(), "channel": Fp8Config(granularity="channel"),
           "block": Fp8Config(granularity="block")}
LAYOUT = {"tensor": "modelopt", "channel": "compressed-tensors", "block": "deepseek"}
DOWN0 = "model.layers.0.mlp.down_proj.weight"


def _online(config, quant):
    model = build_model(config)
    loadfsm.load(model, reference_state_dict(config, 0).items(), quant=quant, device="cpu")
    return model, loadfsm.WeightSync(model)


def _prequantized(tmp_path, quant, granularity):
    tensors = dict(quantize_for_push(load_reference_model(SMALL, seed=0), quant))
    path = write_fp8_checkpoint(tensors, tmp_path / "fp8", layout=LAYOUT[granularity])
    model = build_model(SMALL)
    loadfsm.load(model, path, quant=quant, device="cpu")
    return model, loadfsm.WeightSync(model)


def _nudge(trainer, name, scale=0.5):
    with torch.no_grad():
        dict(trainer.named_parameters())[name].mul_(scale)


def _steps(trainer):
    """Three trainer updates: one layer scaled; a one-ULP change of a small value (its
    bf16 moves, its FP8 does not); two layers scaled."""
    yield lambda: _nudge(trainer, DOWN0)
    def ulp():
        with torch.no_grad():
            w = dict(trainer.named_parameters())["model.layers.1.mlp.gate_up_proj.weight"]
            flat = w.view(-1)
            i = int(flat.abs().argmin())
            flat[i] = torch.nextafter(flat[i].float(), torch.tensor(1.0)).to(w.dtype)
    yield ulp
    def two():
        _nudge(trainer, "model.layers.1.self_attn.o_proj.weight", 2.0)
        _nudge(trainer, "model.norm.weight", 1.5)
    yield two


@pytest.mark.parametrize("granularity", CONFIGS)
def test_online_delta_equals_full_push_and_skips_unchanged_layers(granularity):
    """Each step sends only the changed layers (none for a change FP8 cannot see) and
    leaves the engine bit-identical to one given full pushes; no address moves."""
    quant = CONFIGS[granularity]
    ours, sync = _online(SMALL, quant)
    full, full_sync = _online(SMALL, quant)
    where = addresses(ours)
    trainer = load_reference_model(SMALL, seed=1)
    delta = DeltaPush(quant, sync)
    delta.push(sync, trainer)
    first = delta.report
    assert first.layers_skipped == 0 and first.bytes_skipped == 0
    sent = []
    for step in _steps(trainer):
        step()
        delta.push(sync, trainer)
        full_sync.push(trainer.named_parameters())
        assert_same_tensors(snapshot(ours), snapshot(full))
        sent.append(delta.report)
    assert addresses(ours) == where
    assert [r.layers_sent for r in sent] == [1, 0, 2]
    assert all(r.bytes_skipped > 0 for r in sent)
    assert sent[1].bytes_sent == 0 and sent[1].layers_skipped == first.layers_sent


@pytest.mark.parametrize("granularity", CONFIGS)
def test_prequantized_delta_sends_fp8_of_changed_layers_only(tmp_path, granularity):
    """An engine loaded pre-quantized takes FP8 deltas; it equals a full pre-quantized push."""
    quant = CONFIGS[granularity]
    ours, sync = _prequantized(tmp_path, quant, granularity)
    full, full_sync = _prequantized(tmp_path, quant, granularity)
    trainer = load_reference_model(SMALL, seed=1)
    delta = DeltaPush(quant, sync, prequantized=True)
    delta.push(sync, trainer)
    sent = []
    for step in _steps(trainer):
        step()
        delta.push(sync, trainer)
        full_sync.push(quantize_for_push(trainer, quant))
        assert_same_tensors(snapshot(ours), snapshot(full))
        sent.append(delta.report.layers_sent)
    assert sent == [1, 0, 2]


def test_expert_change_sends_the_experts_layer():
    """One expert changed: its stacked-experts layer goes whole, every other layer stays."""
    quant = Fp8Config()
    ours, sync = _online(SMALL_MOE, quant)
    full, full_sync = _online(SMALL_MOE, quant)
    trainer = load_reference_model(SMALL_MOE, seed=1)
    delta = DeltaPush(quant, sync)
    delta.push(sync, trainer)
    _nudge(trainer, "model.layers.1.mlp.experts.gate_up_proj")
    items = delta(trainer)
    delta.commit()
    sync.push(items)
    full_sync.push(trainer.named_parameters())
    assert_same_tensors(snapshot(ours), snapshot(full))
    assert delta.report.layers_sent == 1
    assert {n.rpartition(".experts.")[0] for n, _ in items} == {"model.layers.1.mlp"}


def test_failed_push_makes_the_next_push_full():
    """After a push the engine refused, the trainer forgets what it sent: all goes again."""
    quant = Fp8Config()
    ours, sync = _online(SMALL, quant)
    trainer = load_reference_model(SMALL, seed=1)
    delta = DeltaPush(quant, sync)
    delta.push(sync, trainer)
    with torch.no_grad():
        dict(trainer.named_parameters())[DOWN0][0, 0] = float("nan")
    with pytest.raises(loadfsm.PushError):
        delta.push(sync, trainer)
    with torch.no_grad():
        dict(trainer.named_parameters())[DOWN0][0, 0] = 0.0
    delta.push(sync, trainer)
    assert delta.report.layers_skipped == 0
    fresh, fresh_sync = _online(SMALL, quant)
    fresh_sync.push(trainer.named_parameters())
    assert_same_tensors(snapshot(ours), snapshot(fresh))
