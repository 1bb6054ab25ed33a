"""Loads on a CUDA device: the device memory bound and agreement with CPU loads."""

import gc

import pytest
import torch

import loadfsm
from loadfsm.testing import build_model, write_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_checkpoint("tiny", tmp_path_factory.mktemp("tiny"), order="interleaved",
                            max_shard_bytes=4 << 20)


def _measured_load(model, tiny_dir, quant):
    """A load whose peak is its own: the kernels readied by an earlier load (a process's
    first layers quantize on the reference while they warm), and no garbage of earlier
    tests freed during it (the peak is taken above the memory allocated at its start)."""
    loadfsm.load(build_model("tiny"), tiny_dir, quant=quant, device="cuda")
    warmup = loadfsm.LoadSession(build_model("tiny"), quant=quant, device="cuda").driver.warmup
    if warmup is not None:      # a cold Triton cache: seconds
        warmup.wait()
    gc.collect()
    return loadfsm.load(model, tiny_dir, quant=quant, device="cuda")


@pytest.mark.parametrize("quant", ["fp8", "fp8-channel", "fp8-block"])
def test_cuda_peak_near_final_plus_one_layer(tiny_dir, quant):
    """torch.cuda.max_memory_allocated during the load stays near final + largest layer."""
    model = build_model("tiny")
    report = _measured_load(model, tiny_dir, quant)
    assert report.states["FINALIZED"] == len(report.layer_states)
    bound = (report.final_bytes + report.largest_layer_bytes) * 1.05 + (4 << 20)
    assert report.cuda_peak_bytes <= bound, (report.cuda_peak_bytes, bound)


@pytest.mark.parametrize("quant", ["fp8", "fp8-channel", "fp8-block"])
def test_cuda_load_matches_cpu_load_bit_for_bit(tiny_dir, quant):
    """The Triton path on CUDA and the torch path on CPU produce identical FP8 tensors."""
    on_cpu, on_gpu = build_model("tiny"), build_model("tiny")
    loadfsm.load(on_cpu, tiny_dir, quant=quant, device="cpu")
    loadfsm.load(on_gpu, tiny_dir, quant=quant, device="cuda")
    gpu_state = on_gpu.state_dict()
    for name, tensor in on_cpu.state_dict().items():
        other = gpu_state[name].cpu()
        if tensor.dtype.itemsize == 1:
            tensor, other = tensor.view(torch.uint8), other.view(torch.uint8)
        assert torch.equal(tensor, other), name


def test_fp8_forward_on_cuda_runs(tiny_dir):
    """The loaded FP8 model runs forward on the GPU (scaled_mm on sm89+)."""
    model = build_model("tiny")
    loadfsm.load(model, tiny_dir, quant="fp8", device="cuda")
    tokens = torch.randint(0, 4096, (2, 16), device="cuda")
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (2, 16, 4096) and torch.isfinite(logits).all()


def test_nan_on_cuda_raises_naming_the_piece(tmp_path):
    """NaN in one fused piece is found by the deferred check and named on CUDA too."""
    from loadfsm.testing import reference_state_dict
    from safetensors.torch import save_file
    state = reference_state_dict("tiny")
    name = "model.layers.2.self_attn.k_proj.weight"
    state[name][1, 1] = float("nan")
    save_file(state, str(tmp_path / "m.safetensors"))
    with pytest.raises(loadfsm.NonFiniteWeightError, match="k_proj") as err:
        loadfsm.load(build_model("tiny"), tmp_path / "m.safetensors", quant="fp8", device="cuda")
    assert err.value.layer == "model.layers.2.self_attn.qkv_proj"


@pytest.mark.parametrize("quant", [None, "fp8", "fp8-block"])
def test_tensors_larger_than_a_ring_buffer_stream_in_chunks(tiny_dir, quant, monkeypatch):
    """With ring buffers smaller than most tensors, every large tensor is assembled on the
    device chunk by chunk: the load is bit-identical to one through whole buffers, the
    handed-over device tensors become the layers' storage, and the bound holds."""
    import loadfsm.sources.safetensors_dir as safetensors_dir
    whole = build_model("tiny")
    whole_report = _measured_load(whole, tiny_dir, quant)
    monkeypatch.setattr(safetensors_dir, "RING_BYTES", 96 << 10)   # not a row multiple
    chunked = build_model("tiny")
    gc.collect()
    report = loadfsm.load(chunked, tiny_dir, quant=quant, device="cuda")
    expected = whole.state_dict()
    for name, tensor in chunked.state_dict().items():
        assert tensor.dtype == expected[name].dtype
        if tensor.dtype.itemsize == 1:
            tensor, other = tensor.view(torch.uint8), expected[name].view(torch.uint8)
        else:
            other = expected[name]
        assert torch.equal(tensor, other), name
    # A large tensor's device memory is taken when the load reaches it, not ahead (that
    # would add the 4 MB head); a fused piece is put together before its copy into the
    # layer (gate and up: 1.4 MB each).
    assert report.cuda_peak_bytes <= whole_report.cuda_peak_bytes + (2 << 20), (
        report.cuda_peak_bytes, whole_report.cuda_peak_bytes)


def test_a_large_tensor_read_on_a_side_stream_is_ready_before_use(tiny_dir, monkeypatch):
    """A consumer on its own stream waits for the reader's chunk copies."""
    import loadfsm.sources.safetensors_dir as safetensors_dir
    monkeypatch.setattr(safetensors_dir, "RING_BYTES", 64 << 10)
    reference = build_model("tiny")
    loadfsm.load(reference, tiny_dir, device="cpu")
    model = build_model("tiny")
    with torch.cuda.stream(torch.cuda.Stream()):
        loadfsm.load(model, tiny_dir, device="cuda")
    torch.cuda.synchronize()
    expected = reference.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor.cpu(), expected[name]), name
