"""Weight versions stamped by commits, and per-layer checksums a trainer can check."""

import pytest
import torch
from structlog.testing import capture_logs

import loadfsm
from loadfsm.quant.config import Fp8Config
from loadfsm.quant.push_fp8 import quantize_for_push
from loadfsm.reload.checksum import expected_checksums, layer_checksums
from loadfsm.testing import build_model, load_reference_model, reference_state_dict
from loadfsm.testing.fp8_checkpoint import write_fp8_checkpoint
from tiny_models import QKV0, SMALL, SMALL_MOE

O_PROJ0 = "model.layers.0.self_attn.o_proj"


def _engine(config=SMALL, **kwargs):
    model = build_model(config)
    loadfsm.load(model, reference_state_dict(config, 0).items(), quant="fp8", device="cpu")
    return model, loadfsm.WeightSync(model, trace=True, **kwargs)


def _trainer(config=SMALL, seed=1):
    return load_reference_model(config, seed=seed)


def test_push_stamps_its_version_on_every_layer_it_commits():
    """After a full push, the sync, its report, every layer and push_complete carry the version."""
    _, sync = _engine()
    assert sync.version is None and set(sync.layer_versions.values()) == {None}
    with capture_logs() as logs:
        report = sync.push(_trainer().named_parameters(), version="step-7")
    assert sync.version == report.version == "step-7"
    assert set(sync.layer_versions.values()) == {"step-7"}
    assert [e["version"] for e in logs if e["event"] == "push_complete"] == ["step-7"]


def test_partial_push_stamps_only_the_layers_it_touched():
    """Layers a push does not name keep the version of the push that last committed them."""
    _, sync = _engine()
    trainer = dict(_trainer().named_parameters())
    sync.push(trainer.items(), version=1)
    sync.push([(f"{O_PROJ0}.weight", trainer[f"{O_PROJ0}.weight"])], version=2)
    assert sync.layer_versions[O_PROJ0] == 2 and sync.version == 2
    assert {v for name, v in sync.layer_versions.items() if name != O_PROJ0} == {1}


def test_failed_push_stamps_only_what_committed():
    """A push that fails midway stamps the layers it committed; the rest and ``version``
    keep the previous push's."""
    _, sync = _engine(commit_bytes=1)        # every verified layer commits at once
    sync.push(_trainer().named_parameters(), version=1)
    weights = list(_trainer(seed=2).named_parameters())
    bad = [(n, t.detach().clone().fill_(float("nan")) if n.startswith(O_PROJ0) else t)
           for n, t in weights]
    with pytest.raises(loadfsm.PushError) as caught:
        sync.push(bad, version=2)
    committed = caught.value.committed
    assert committed and O_PROJ0 not in committed
    assert {n for n, v in sync.layer_versions.items() if v == 2} == set(committed)
    assert sync.layer_versions[O_PROJ0] == 1 and sync.version == 1


@pytest.mark.parametrize("config", [SMALL, SMALL_MOE], ids=["dense", "moe"])
def test_trainer_checksums_equal_the_engines_after_a_push(config):
    """``expected_checksums`` of the pushed weights equals the engine's ``layer_checksums``."""
    _, sync = _engine(config)
    trainer = _trainer(config)
    sync.push(trainer.named_parameters())
    expected = expected_checksums(build_model(config), trainer.named_parameters(),
                                  quant="fp8", device="cpu")
    assert expected == layer_checksums(sync)
    assert expected.keys() == sync.layer_versions.keys()


def test_one_changed_tensor_changes_only_its_layers_checksum():
    """The trainer changing one tensor changes that layer's expected checksum alone, and the
    engine's agrees once pushed."""
    _, sync = _engine()
    trainer = _trainer()
    before = expected_checksums(build_model(SMALL), trainer.named_parameters(), quant="fp8",
                                device="cpu")
    with torch.no_grad():
        trainer.get_submodule(QKV0).weight[3, 5] += 1.0
    after = expected_checksums(build_model(SMALL), trainer.named_parameters(), quant="fp8",
                               device="cpu")
    assert [name for name in before if before[name] != after[name]] == [QKV0]
    sync.push(trainer.named_parameters())
    assert layer_checksums(sync) == after


def test_checksum_sees_one_flipped_bit_in_a_live_tensor():
    """A single bit flipped in an engine tensor changes that layer's checksum, no other."""
    model, sync = _engine()
    before = layer_checksums(sync)
    weight = model.get_submodule(QKV0).weight
    with torch.no_grad():
        weight.view(torch.uint8).view(-1)[100] ^= 1
    after = layer_checksums(sync)
    assert [name for name in before if before[name] != after[name]] == [QKV0]


def test_checksum_depends_on_positions_not_only_values():
    """Swapping two different elements of a tensor changes its layer's checksum."""
    model, sync = _engine()
    before = layer_checksums(sync)
    weight = model.get_submodule(O_PROJ0).weight.view(torch.uint8).view(-1)
    first, second = 0, int((weight != weight[0]).nonzero()[0])
    with torch.no_grad():
        weight[first], weight[second] = weight[second].clone(), weight[first].clone()
    assert layer_checksums(sync)[O_PROJ0] != before[O_PROJ0]


def test_checksums_of_a_model_equal_those_of_its_sync():
    """``layer_checksums(model)`` re-plans the loaded model and gives the sync's numbers."""
    model, sync = _engine()
    assert layer_checksums(model) == layer_checksums(sync)


def test_prequantized_push_equals_the_checksums_of_its_bf16_weights(tmp_path):
    """A trainer pushing FP8 it quantized itself (``quantize_for_push``) into an engine
    loaded pre-quantized: the engine's checksums are ``expected_checksums`` of the bf16
    weights under the engine's config."""
    config = Fp8Config(granularity="block")
    tensors = dict(quantize_for_push(load_reference_model(SMALL, seed=0), config))
    model = build_model(SMALL)
    loadfsm.load(model, write_fp8_checkpoint(tensors, tmp_path, layout="deepseek"),
                 quant=config, device="cpu")
    sync = loadfsm.WeightSync(model)
    trainer = _trainer()
    sync.push(quantize_for_push(trainer, config))
    assert layer_checksums(sync) == expected_checksums(
        build_model(SMALL), trainer.named_parameters(), quant=config, device="cpu")


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@CUDA
def test_checksums_on_cuda_equal_the_cpus_with_no_sync_per_layer():
    """The same weights give the same numbers on CUDA as on CPU, computed with two
    synchronizing transfers (the constants in, the results out) for the whole model."""
    cpu, _ = _engine()
    model = build_model(SMALL)
    loadfsm.load(model, reference_state_dict(SMALL, 0).items(), quant="fp8", device="cuda")
    sync = loadfsm.WeightSync(model)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as warned:
            on_cuda = layer_checksums(sync)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert on_cuda == layer_checksums(cpu)
    assert len([w for w in warned if "synchroniz" in str(w.message)]) <= 2
