"""Pre-quantized FP8 checkpoints (DeepSeek-V3 block scales, compressed-tensors per-channel,
ModelOpt per-tensor) load through the same layer machines: the FP8 weight and its scale
are two pieces of one layer, installed with no bf16 staging."""

import dataclasses

import pytest
import torch
from structlog.testing import capture_logs
from torch import nn

import loadfsm
from loadfsm.errors import InvalidScaleError
from loadfsm.quant.config import Fp8Config
from loadfsm.quant.fp8 import dequantize_fp8, quantize_fp8, sqnr_db
from loadfsm.quant.fp8_layout import Fp8CheckpointConfig, detect_fp8_checkpoint
from loadfsm.quant.prequantized import PrequantizedFp8Linear, PrequantizedFp8StackedExperts
from loadfsm.quant.push_fp8 import quantize_for_push
from loadfsm.testing import build_model, load_reference_model, reference_state_dict
from loadfsm.testing.engine_llama import EngineLlamaForCausalLM
from loadfsm.testing.fp8_checkpoint import (LAYOUTS, dequantized_state, quantize_state,
                                            write_fp8_checkpoint)
from checks import same
from tiny_models import SMALL, SMALL_MOE

QKV = "model.layers.0.self_attn.qkv_proj"
Q_SCALE = {"deepseek": "model.layers.0.self_attn.q_proj.weight_scale_inv",
           "compressed-tensors": "model.layers.0.self_attn.q_proj.weight_scale",
           "modelopt": "model.layers.0.self_attn.q_proj.weight_scale"}
GRANULARITY = {"deepseek": "block", "compressed-tensors": "channel", "modelopt": "tensor"}


def _fp8_checkpoint(tmp_path, layout, state=None, **edits):
    """SMALL's reference weights in ``layout``; ``edits`` replace tensors (``None``: drop)."""
    tensors = quantize_state(state or reference_state_dict(SMALL), layout)
    for name, value in edits.items():
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    return write_fp8_checkpoint(tensors, tmp_path / layout, layout=layout), tensors


def _bf16_twin(tensors, layout):
    """SMALL loaded in bf16 from the weights the FP8 checkpoint stands for."""
    model = build_model(SMALL)
    loadfsm.load(model, dequantized_state(tensors, layout).items(), device="cpu")
    return model


def _linears(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)
            or isinstance(m, PrequantizedFp8Linear)}


def _dequantized(module):
    return dequantize_fp8(module.weight, module.weight_scale, module.config, module.out_dtype)


@pytest.mark.parametrize("layout", ["deepseek", "compressed-tensors"])
def test_each_layout_loads_finalized_with_the_stored_weights(tmp_path, layout):
    """Every layer ends FINALIZED; each FP8 layer dequantizes to the stored weights exactly."""
    path, tensors = _fp8_checkpoint(tmp_path, layout)
    model = build_model(SMALL)
    report = loadfsm.load(model, path, quant=f"fp8-{GRANULARITY[layout]}", device="cpu")
    assert report.states["FINALIZED"] == len(report.layer_states)
    twin = _bf16_twin(tensors, layout)
    fp8 = {n: m for n, m in model.named_modules() if isinstance(m, PrequantizedFp8Linear)}
    assert len(fp8) == 8 and all(m.config.granularity == GRANULARITY[layout]
                                 for m in fp8.values())
    for name, module in fp8.items():
        assert same(_dequantized(module), twin.get_submodule(name).weight), name
    assert same(model.lm_head.weight, twin.lm_head.weight)       # kept in bf16


def test_per_tensor_scales_shared_by_a_fused_layer_load_exactly(tmp_path):
    """ModelOpt-style per-tensor scales: q/k/v pieces carrying one scale (one tensor
    quantized, then split) load bit for bit, static input scales read and not used."""
    ref = load_reference_model(SMALL)
    tensors = dict(quantize_for_push(ref, Fp8Config(granularity="tensor")))
    tensors.update({n[:-len("weight")] + "input_scale": torch.tensor(0.5)
                    for n, t in list(tensors.items()) if t.dtype == torch.float8_e4m3fn})
    path = write_fp8_checkpoint(tensors, tmp_path, layout="modelopt")
    model = build_model(SMALL)
    report = loadfsm.load(model, path, quant="fp8", device="cpu")
    assert report.states["FINALIZED"] == len(report.layer_states)
    qkv = model.get_submodule(QKV)
    assert "input_scale" not in dict(qkv.named_parameters())
    q, scale = quantize_fp8(ref.get_submodule(QKV).weight.detach(), Fp8Config())
    assert same(qkv.weight, q) and same(qkv.weight_scale, scale)


def test_per_tensor_scales_that_differ_in_a_fused_layer_take_the_largest(tmp_path):
    """Separately quantized q/k/v (ModelOpt) share one scale in the fused layer, as vLLM
    does: the largest; the piece that had it is exact, the rest keep SQNR >= 25 dB."""
    path, tensors = _fp8_checkpoint(tmp_path, "modelopt")
    model = build_model(SMALL)
    loadfsm.load(model, path, quant="fp8", device="cpu")
    twin = _bf16_twin(tensors, "modelopt")
    qkv, ref = model.get_submodule(QKV), twin.get_submodule(QKV).weight
    scales = [tensors[f"model.layers.0.self_attn.{p}_proj.weight_scale"] for p in "qkv"]
    assert same(qkv.weight_scale, torch.stack(scales).amax())
    assert sqnr_db(ref.float(), _dequantized(qkv).float()) >= 25.0


def test_peak_is_the_final_model_with_no_bf16_staging(tmp_path):
    """Peak <= final + the largest layer's FP8 bytes (ledger): FP8 codes are staged as FP8
    and installed as they are, where an online FP8 load of the same weights stages the
    largest layer in bf16, twice its FP8 bytes."""
    path, tensors = _fp8_checkpoint(tmp_path, "deepseek")
    report = loadfsm.load(build_model(SMALL), path, quant="fp8-block", device="cpu")
    fp8_layer = 512 * 64 + 4 * 4          # fused q/k/v codes and their 4 block scales
    assert report.peak_bytes <= report.final_bytes + fp8_layer
    assert report.largest_layer_bytes == fp8_layer
    online = loadfsm.load(build_model(SMALL), dequantized_state(tensors, "deepseek").items(),
                          quant="fp8-block", device="cpu")
    assert online.largest_layer_bytes == 2 * (fp8_layer - 16)
    assert report.final_bytes == online.final_bytes


def test_another_granularity_asked_warns_and_keeps_the_checkpoints(tmp_path):
    """quant="fp8" on a block-FP8 checkpoint: a warning names both; block scales are kept."""
    path, _ = _fp8_checkpoint(tmp_path, "deepseek")
    model = build_model(SMALL)
    with capture_logs() as logs:
        report = loadfsm.load(model, path, quant="fp8", device="cpu")
    warned = [e for e in logs if e["event"] == "checkpoint_quant_differs"]
    assert warned and warned[0]["asked"] == "fp8" and warned[0]["checkpoint"] == "fp8-block 128x128"
    assert warned[0]["action"] == "keep" and report.quant == "fp8-block-prequantized"
    assert model.get_submodule(QKV).config.granularity == "block"


def test_requantize_is_explicit_and_equals_an_online_load(tmp_path):
    """Fp8Config(requantize=True) requantizes on the device: bit-identical to an online
    load of the dequantized weights at the asked granularity."""
    path, tensors = _fp8_checkpoint(tmp_path, "deepseek")
    asked = Fp8Config(granularity="channel", requantize=True)
    model = build_model(SMALL)
    with capture_logs() as logs:
        loadfsm.load(model, path, quant=asked, device="cpu")
    assert any(e["event"] == "checkpoint_quant_differs" and e["action"] == "requantize"
               for e in logs)
    online = build_model(SMALL)
    loadfsm.load(online, dequantized_state(tensors, "deepseek").items(), quant=asked,
                 device="cpu")
    for name, module in _linears(online).items():
        ours = model.get_submodule(name)
        assert same(ours.weight, module.weight), name
        if hasattr(module, "weight_scale"):
            assert same(ours.weight_scale, module.weight_scale), name


def _nan(shape):
    return torch.full(shape, float("nan"))


BAD_SCALES = {
    "wrong shape": (lambda s: torch.ones(s.numel() + 1),
                    loadfsm.ShapeMismatchError),
    "nan": (lambda s: _nan(s.shape), loadfsm.NonFiniteWeightError),
    "inf": (lambda s: torch.full(s.shape, float("inf")), loadfsm.NonFiniteWeightError),
    "zero": (lambda s: torch.zeros(s.shape), InvalidScaleError),
    "negative": (lambda s: -torch.ones(s.shape), InvalidScaleError),
    "missing": (lambda s: None, loadfsm.IncompleteLoadError),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bad", BAD_SCALES, ids=list(BAD_SCALES))
def test_a_bad_scale_raises_naming_tensor_and_layer_and_installs_nothing_of_it(
        tmp_path, layout, bad):
    """Wrong shape, NaN, Inf, zero, negative or missing: a typed LoadError naming the
    scale (or its layer), and the layer is not installed."""
    make, error = BAD_SCALES[bad]
    scale = quantize_state(reference_state_dict(SMALL), layout)[Q_SCALE[layout]]
    path, _ = _fp8_checkpoint(tmp_path, layout, **{Q_SCALE[layout]: make(scale)})
    model = build_model(SMALL)
    with pytest.raises(error) as err:
        loadfsm.load(model, path, quant="fp8", device="cpu")
    assert err.value.layer == QKV
    if bad == "missing":
        assert err.value.missing[QKV] == [Q_SCALE[layout]]
    else:
        assert err.value.tensor == Q_SCALE[layout]
    assert isinstance(model.get_submodule(QKV), nn.Linear)
    assert model.get_submodule(QKV).weight.is_meta


def test_fp8_weight_without_fp8_dtype_is_refused(tmp_path):
    """A bf16 tensor where the checkpoint's layout says FP8 is refused, not cast."""
    state = reference_state_dict(SMALL)
    path, _ = _fp8_checkpoint(tmp_path, "deepseek", **{
        "model.layers.0.self_attn.k_proj.weight": state["model.layers.0.self_attn.k_proj.weight"]})
    with pytest.raises(loadfsm.DtypeMismatchError) as err:
        loadfsm.load(build_model(SMALL), path, quant="fp8-block", device="cpu")
    assert err.value.tensor == "model.layers.0.self_attn.k_proj.weight"


def test_a_config_written_by_hand_loads_an_iterable_of_fp8_tensors():
    """No headers to read: an explicit Fp8CheckpointConfig says the layout, and every
    linear it does not exclude takes FP8 pieces."""
    tensors = quantize_state(reference_state_dict(SMALL), "deepseek")
    layout = Fp8CheckpointConfig("block", scale_name="weight_scale_inv", exclude=("lm_head",))
    model = build_model(SMALL)
    report = loadfsm.load(model, tensors.items(), quant=layout, device="cpu")
    assert report.states["FINALIZED"] == len(report.layer_states)
    twin = _bf16_twin(tensors, "deepseek")
    assert same(_dequantized(model.get_submodule(QKV)), twin.get_submodule(QKV).weight)


def test_layouts_are_read_from_headers_and_config():
    """Names, dtypes and scale shapes give the layout; config.json gives the block size."""
    tensors = quantize_state(reference_state_dict(SMALL), "deepseek", block_size=(64, 32))
    entries = {n: loadfsm.plan.TensorEntry(n, tuple(t.shape), t.dtype)
               for n, t in tensors.items()}
    layout = detect_fp8_checkpoint(entries, {"quant_method": "fp8",
                                             "weight_block_size": [64, 32]})
    assert (layout.granularity, layout.block_size, layout.scale_name) == (
        "block", (64, 32), "weight_scale_inv")
    assert "lm_head" in layout.exclude and "model.layers.0.mlp.gate_proj.weight" in layout.quantized
    with pytest.raises(loadfsm.ShapeMismatchError, match="fits no layout"):
        detect_fp8_checkpoint(entries, None)                      # 128x128 does not fit
    plain = {n: e for n, e in entries.items() if e.dtype != torch.float8_e4m3fn}
    assert detect_fp8_checkpoint(plain, {"quant_method": "fp8"}) is None


def test_engine_classes_are_refused_before_reading():
    """An engine's own linears (vLLM's online layout) have no place for checkpoint scales:
    a ModelStateError names the layer before any data is read."""
    layout = Fp8CheckpointConfig("block", scale_name="weight_scale_inv")
    with torch.device("meta"):
        meta = EngineLlamaForCausalLM(SMALL)
    with pytest.raises(loadfsm.ModelStateError, match="pre-quantized") as err:
        loadfsm.LoadSession(meta, quant=layout, device="cpu")
    assert err.value.layer == QKV


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stacked_experts_load_prequantized_with_scales_per_expert(tmp_path, layout):
    """One FP8 tensor and one scale per expert projection (DeepSeek-V3's MoE layout)
    land in the stacked experts; routers stay bf16; logits equal the bf16 model of the
    dequantized weights (per-tensor gate/up scales of an expert share the largest)."""
    tensors = quantize_state(reference_state_dict(SMALL_MOE), layout, block_size=(32, 32))
    path = write_fp8_checkpoint(tensors, tmp_path, layout=layout, block_size=(32, 32))
    model = build_model(SMALL_MOE)
    report = loadfsm.load(model, path, quant="fp8", device="cpu")
    assert report.states["FINALIZED"] == len(report.layer_states)
    twin = build_model(SMALL_MOE)
    loadfsm.load(twin, dequantized_state(tensors, layout, block_size=(32, 32)).items(),
                 device="cpu")
    experts = model.get_submodule("model.layers.0.mlp.experts")
    assert isinstance(experts, PrequantizedFp8StackedExperts)
    assert isinstance(model.get_submodule("model.layers.0.mlp.gate"), nn.Linear)
    ref = twin.get_submodule("model.layers.0.mlp.experts")
    down = dequantize_fp8(experts.down_proj, experts.down_proj_scale, experts.config)
    assert same(down, ref.down_proj)
    gate_up = dequantize_fp8(experts.gate_up_proj, experts.gate_up_proj_scale, experts.config)
    if layout == "modelopt":
        assert sqnr_db(ref.gate_up_proj.float(), gate_up.float()) >= 25.0
        return
    assert same(gate_up, ref.gate_up_proj)
    ids = torch.randint(0, SMALL_MOE.vocab_size, (2, 8),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), twin(ids))


def test_the_config_is_frozen_and_validated():
    """An unknown granularity, scale name or per-tensor shape is refused."""
    with pytest.raises(ValueError):
        Fp8CheckpointConfig("row")
    with pytest.raises(ValueError):
        Fp8CheckpointConfig("block", scale_name="scale")
    with pytest.raises(ValueError):
        Fp8CheckpointConfig("tensor", tensor_scale_shape=(2,))
    with pytest.raises(dataclasses.FrozenInstanceError):
        Fp8CheckpointConfig("block").granularity = "tensor"


def test_fused_rows_that_split_a_scale_block_are_refused(tmp_path):
    """q/k/v rows that are not whole blocks cannot share a block-scaled weight: the
    planner names the scale and the layer (vLLM refuses the same checkpoints)."""
    layout = Fp8CheckpointConfig("block", block_size=(96, 128), scale_name="weight_scale_inv")
    with pytest.raises(loadfsm.ShapeMismatchError, match="split a 96-row") as err:
        loadfsm.LoadSession(build_model(SMALL), quant=layout, device="cpu")
    assert err.value.layer == QKV
    assert err.value.tensor == "model.layers.0.self_attn.q_proj.weight_scale_inv"  # rows 0:256


def test_a_nan_code_in_an_fp8_weight_is_named(tmp_path):
    """FP8 codes are checked by their bits (no FP8 norm kernel): a NaN code (0x7F) in a
    weight raises NonFiniteWeightError naming that weight, before its layer installs."""
    weight = "model.layers.0.self_attn.v_proj.weight"
    q = quantize_state(reference_state_dict(SMALL), "compressed-tensors")[weight].clone()
    q.view(torch.uint8)[5, 7] = 0x7F
    path, _ = _fp8_checkpoint(tmp_path, "compressed-tensors", **{weight: q})
    model = build_model(SMALL)
    with pytest.raises(loadfsm.NonFiniteWeightError) as err:
        loadfsm.load(model, path, quant="fp8-channel", device="cpu")
    assert (err.value.tensor, err.value.layer) == (weight, QKV)
    assert model.get_submodule(QKV).weight.is_meta


def test_the_dry_run_plans_a_prequantized_checkpoint_as_the_load_runs_it(tmp_path):
    """``loadfsm plan`` reads the layout too: FP8 layers, bytes to read and final bytes
    are those of the real load."""
    from loadfsm.plan_cli import plan_checkpoint
    path, _ = _fp8_checkpoint(tmp_path, "deepseek")
    plan = plan_checkpoint(path, model=SMALL, quant="fp8-block")
    report = loadfsm.load(build_model(SMALL), path, quant="fp8-block", device="cpu")
    assert plan.quant == report.quant == "fp8-block-prequantized" and not plan.missing
    assert (plan.bytes_to_read, plan.final_bytes) == (report.bytes_read, report.final_bytes)
    assert {layer.handler for layer in plan.layers} >= {"PrequantizedLinearHandler"}
