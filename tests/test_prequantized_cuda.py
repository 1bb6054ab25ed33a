"""Pre-quantized FP8 on a CUDA device: the same bytes as on the CPU, the device memory
bound, and trainer-quantized pushes equal to the Triton online quantization."""

import pytest
import torch

import loadfsm
from loadfsm.quant.config import Fp8Config
from loadfsm.testing import build_model, load_reference_model, reference_state_dict
from loadfsm.testing import write_checkpoint
from loadfsm.testing.fp8_checkpoint import LAYOUTS, quantize_state, write_fp8_checkpoint
from checks import addresses, assert_same_tensors, snapshot
from tiny_models import SMALL

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

GRANULARITY = {"deepseek": "block", "compressed-tensors": "channel", "modelopt": "tensor"}


def _on_cpu(state):
    return {name: tensor.cpu() for name, tensor in state.items()}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_load_matches_cpu_load_and_stays_near_final(tmp_path, layout):
    """Bit for bit the CPU's tensors; torch.cuda.max_memory_allocated near final + the
    largest staged layer (FP8 bytes: no bf16 staging)."""
    path = write_fp8_checkpoint(quantize_state(reference_state_dict(SMALL), layout),
                                tmp_path, layout=layout)
    quant = f"fp8-{GRANULARITY[layout]}".replace("fp8-tensor", "fp8")
    on_cpu, on_gpu = build_model(SMALL), build_model(SMALL)
    loadfsm.load(on_cpu, path, quant=quant, device="cpu")
    report = loadfsm.load(on_gpu, path, quant=quant, device="cuda")
    assert_same_tensors(_on_cpu(snapshot(on_gpu)), snapshot(on_cpu))
    bound = (report.final_bytes + report.largest_layer_bytes) * 1.05 + (4 << 20)
    assert report.cuda_peak_bytes <= bound, (report.cuda_peak_bytes, bound)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_trainer_quantize_push_on_cuda_equals_the_online_engine(tmp_path, granularity):
    """quantize_for_push on the GPU (Triton) gives the bytes the online engine's own
    quantization of the bf16 push gives; no address moves."""
    config = Fp8Config(granularity=granularity)
    online = build_model(SMALL)
    loadfsm.load(online, write_checkpoint(SMALL, tmp_path / "bf16"), quant=config,
                 device="cuda")
    tensors = dict(loadfsm.quantize_for_push(load_reference_model(SMALL, device="cuda"),
                                             config))
    layout = {"tensor": "modelopt", "channel": "compressed-tensors", "block": "deepseek"}
    ours = build_model(SMALL)
    loadfsm.load(ours, write_fp8_checkpoint(_on_cpu(tensors), tmp_path / "fp8",
                                            layout=layout[granularity]),
                 quant=config, device="cuda")
    before = addresses(ours)
    trainer = load_reference_model(SMALL, seed=1, device="cuda")
    loadfsm.WeightSync(online).push(trainer.named_parameters())
    loadfsm.WeightSync(ours).push(loadfsm.quantize_for_push(trainer, config))
    assert_same_tensors(snapshot(ours), snapshot(online))
    assert addresses(ours) == before


def test_a_zero_scale_on_cuda_raises_naming_it(tmp_path):
    """The zero-scale check runs on the device too, naming the scale and its layer."""
    tensors = quantize_state(reference_state_dict(SMALL), "deepseek")
    scale = "model.layers.1.mlp.up_proj.weight_scale_inv"
    tensors[scale] = torch.zeros_like(tensors[scale])
    path = write_fp8_checkpoint(tensors, tmp_path, layout="deepseek")
    with pytest.raises(loadfsm.InvalidScaleError) as err:
        loadfsm.load(build_model(SMALL), path, quant="fp8-block", device="cuda")
    assert (err.value.tensor, err.value.layer) == (scale, "model.layers.1.mlp.gate_up_proj")
