"""Pre-quantized pushes: a trainer quantizes as the engine would (``quantize_for_push``) and
pushes FP8 weights with their scales; the engine installs them in place after the same
checks a load makes, bit-identical to quantizing the bf16 push itself."""

import pytest
import torch

import loadfsm
from loadfsm.errors import InvalidScaleError
from loadfsm.quant.config import Fp8Config
from loadfsm.quant.push_fp8 import quantize_for_push
from loadfsm.testing import build_model, load_reference_model, write_checkpoint
from loadfsm.testing.fp8_checkpoint import write_fp8_checkpoint
from checks import addresses, assert_same_tensors, snapshot
from tiny_models import SMALL, SMALL_MOE

CONFIGS = {"tensor": Fp8Config(), "channel": Fp8Config(granularity="channel"),
           "block": Fp8Config(granularity="block")}
LAYOUT = {"tensor": "modelopt", "channel": "compressed-tensors", "block": "deepseek"}
QKV = "model.layers.0.self_attn.qkv_proj"


def _prequantized_engine(tmp_path, config, seed=0):
    """SMALL loaded from the checkpoint a trainer's ``quantize_for_push`` writes."""
    tensors = dict(quantize_for_push(load_reference_model(SMALL, seed=seed), config))
    path = write_fp8_checkpoint(tensors, tmp_path / f"fp8-{seed}",
                                layout=LAYOUT[config.granularity])
    model = build_model(SMALL)
    loadfsm.load(model, path, quant=config, device="cpu")
    return model


def _online_engine(tmp_path, config, seed=0):
    model = build_model(SMALL)
    loadfsm.load(model, write_checkpoint(SMALL, tmp_path / f"bf16-{seed}", seed=seed),
                 quant=config, device="cpu")
    return model


@pytest.mark.parametrize("granularity", CONFIGS)
def test_trainer_quantize_then_push_equals_the_engine_quantizing_the_bf16_push(
        tmp_path, granularity):
    """Same bytes as an online-FP8 engine given the bf16 weights, no address moved, and
    the FP8 layers' bytes on the wire halved."""
    config = CONFIGS[granularity]
    online, ours = _online_engine(tmp_path, config), _prequantized_engine(tmp_path, config)
    assert_same_tensors(snapshot(ours), snapshot(online))
    before = addresses(ours)
    trainer = load_reference_model(SMALL, seed=1)
    bf16 = loadfsm.WeightSync(online).push(trainer.named_parameters())
    pieces = list(quantize_for_push(trainer, config))
    fp8 = loadfsm.WeightSync(ours).push(pieces)
    assert_same_tensors(snapshot(ours), snapshot(online))
    assert addresses(ours) == before
    assert fp8.layers_updated == bf16.layers_updated
    linear_bf16 = sum(p.numel() * 2 for n, p in trainer.named_parameters()
                      if n.endswith("proj.weight"))
    scales = sum(t.numel() * 4 for n, t in pieces if n.endswith(("_scale", "_scale_inv")))
    assert fp8.bytes_received <= bf16.bytes_received - linear_bf16 // 2 + scales


@pytest.mark.parametrize("granularity", CONFIGS)
def test_a_push_equals_a_fresh_load_of_the_same_fp8_bytes(tmp_path, granularity):
    """Pushing seed 1's FP8 tensors into seed 0's engine gives seed 1's engine."""
    config = CONFIGS[granularity]
    pushed = _prequantized_engine(tmp_path, config, seed=0)
    loadfsm.WeightSync(pushed).push(
        quantize_for_push(load_reference_model(SMALL, seed=1), config))
    assert_same_tensors(snapshot(pushed), snapshot(_prequantized_engine(tmp_path, config, 1)))


@pytest.mark.parametrize("bad", ["zero", "nan", "inf", "shape", "missing", "bf16 weight"])
def test_a_bad_push_rolls_back_and_names_the_tensor(tmp_path, bad):
    """Zero/NaN/Inf/misshapen/missing scales or a bf16 weight in an FP8 push: PushError
    naming the layer, its cause typed, and the model bit for bit as before."""
    config = CONFIGS["block"]
    model = _prequantized_engine(tmp_path, config)
    before = snapshot(model)
    trainer = load_reference_model(SMALL, seed=1)
    scale = "model.layers.0.self_attn.k_proj.weight_scale_inv"
    weight = "model.layers.0.self_attn.k_proj.weight"
    pushed = dict(quantize_for_push(trainer, config))
    cause = {"zero": InvalidScaleError, "nan": loadfsm.NonFiniteWeightError,
             "inf": loadfsm.NonFiniteWeightError, "shape": loadfsm.ShapeMismatchError,
             "missing": None, "bf16 weight": loadfsm.DtypeMismatchError}[bad]
    if bad == "missing":
        del pushed[scale]
    elif bad == "bf16 weight":
        pushed[weight] = dict(trainer.named_parameters())[f"{QKV}.weight"][256:384]
    else:
        pushed[scale] = {"zero": torch.zeros_like, "shape": lambda t: torch.ones(t.numel() + 1),
                         "nan": lambda t: torch.full_like(t, float("nan")),
                         "inf": lambda t: torch.full_like(t, float("inf"))}[bad](pushed[scale])
    with pytest.raises(loadfsm.PushError) as err:
        loadfsm.WeightSync(model).push(pushed.items())
    assert err.value.layer == QKV
    assert cause is None or isinstance(err.value.__cause__, cause)
    assert QKV not in err.value.committed
    after = snapshot(model)
    kept = {n: t for n, t in before.items()
            if not any(n.startswith(layer + ".") for layer in err.value.committed)}
    assert f"{QKV}.weight" in kept
    assert_same_tensors({n: after[n] for n in kept}, kept)


def test_a_bf16_push_into_a_prequantized_engine_is_refused(tmp_path):
    """The engine takes pushes in the form it loaded: FP8 with scales, not bf16."""
    model = _prequantized_engine(tmp_path, CONFIGS["channel"])
    with pytest.raises(loadfsm.PushError) as err:
        loadfsm.WeightSync(model).push(load_reference_model(SMALL, seed=1).named_parameters())
    assert isinstance(err.value.__cause__, loadfsm.DtypeMismatchError)


@pytest.mark.parametrize("granularity", ["tensor", "block"])
def test_stacked_experts_take_a_prequantized_push_as_the_online_engine_would(
        tmp_path, granularity):
    """MoE: per-expert scales from the trainer's stacked experts, split per expert in
    checkpoint naming, land bit-identical to the online engine given the bf16 push."""
    config = Fp8Config(granularity=granularity, block_size=(32, 32))
    online = build_model(SMALL_MOE)
    loadfsm.load(online, write_checkpoint(SMALL_MOE, tmp_path / "bf16"), quant=config,
                 device="cpu")
    ours = build_model(SMALL_MOE)
    tensors = dict(quantize_for_push(load_reference_model(SMALL_MOE), config))
    loadfsm.load(ours, write_fp8_checkpoint(tensors, tmp_path / "fp8",
                                            layout=LAYOUT[granularity], block_size=(32, 32)),
                 quant=config, device="cpu")
    assert_same_tensors(snapshot(ours), snapshot(online))
    before = addresses(ours)
    trainer = load_reference_model(SMALL_MOE, seed=1)
    loadfsm.WeightSync(online).push(trainer.named_parameters())
    loadfsm.WeightSync(ours).push(quantize_for_push(trainer, config))
    assert_same_tensors(snapshot(ours), snapshot(online))
    assert addresses(ours) == before
