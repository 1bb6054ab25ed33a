"""Kernels are readied in a background thread and the first quantize waits for it."""

import threading
import time

import pytest
import torch

import loadfsm
from loadfsm.handlers.base import Handler
from loadfsm.loading.drive import run
from loadfsm.loading.warmup import KernelWarmup
from loadfsm.sources.safetensors_dir import SafetensorsSource
from loadfsm.testing import build_model, write_checkpoint


class _Preparing(Handler):
    def __init__(self, delay: float, error: Exception | None = None):
        self.delay, self.error, self.events = delay, error, []

    def prepare(self, config, device):
        self.events.append(("start", threading.current_thread().name))
        time.sleep(self.delay)
        self.events.append(("done", None))
        if self.error is not None:
            raise self.error


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_checkpoint("tiny", tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("error", [None, RuntimeError("no kernel")])
def test_the_first_quantize_waits_for_the_warmup(tiny_dir, monkeypatch, error):
    """The warm-up runs in its own thread; the first layer is quantized after it ends, and
    a warm-up that fails changes nothing (the real kernel would fail, typed, itself)."""
    handler = _Preparing(0.6, error)
    session = loadfsm.LoadSession(build_model("tiny"), quant="fp8", device="cpu")
    quantized = []
    real = session.driver._quantize
    monkeypatch.setattr(session.driver, "_quantize",
                        lambda rec, *more: (quantized.append(list(handler.events)),
                                                 real(rec, *more))[1])
    session.driver.warmup = KernelWarmup([handler], session.quant, torch.device("cpu"))
    run(session, SafetensorsSource(tiny_dir))
    assert handler.events[0] == ("start", "loadfsm-warmup")
    assert quantized[0] == [("start", "loadfsm-warmup"), ("done", None)]
    assert session.driver.warmup is None
    reference = build_model("tiny")
    loadfsm.load(reference, tiny_dir, quant="fp8", device="cpu")
    expected = reference.state_dict()
    for name, tensor in session.model.state_dict().items():
        other = expected[name]
        if tensor.dtype.itemsize == 1:
            tensor, other = tensor.view(torch.uint8), other.view(torch.uint8)
        assert torch.equal(tensor, other), name


def test_no_warmup_thread_on_the_cpu():
    session = loadfsm.LoadSession(build_model("tiny"), quant="fp8", device="cpu")
    assert session.driver.warmup is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_session_warms_its_fp8_kernels():
    session = loadfsm.LoadSession(build_model("tiny"), quant="fp8", device="cuda")
    assert session.driver.warmup is not None
    session.driver.warmup.wait()
