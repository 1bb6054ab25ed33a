"""Kernels are readied in a background thread and the first quantize waits for it."""

import threading

import pytest
import torch

import loadfsm
import loadfsm.quant.fp8 as fp8
from loadfsm.handlers.base import Handler
from loadfsm.loading.warmup import KernelWarmup
from loadfsm.sources.safetensors_dir import SafetensorsSource
from loadfsm.testing import build_model, write_checkpoint


class _Preparing(Handler):
    def __init__(self, release: threading.Event, error: Exception | None = None):
        self.release, self.error, self.events = release, error, []

    def prepare(self, config, device):
        self.events.append(("start", threading.current_thread().name))
        self.release.wait(30)
        self.events.append(("done", None))
        if self.error is not None:
            raise self.error


@pytest.fixture(autouse=True)
def nothing_prepared_yet(monkeypatch):
    """Each test starts as a fresh process would: no kernels prepared."""
    monkeypatch.setattr(KernelWarmup, "_prepared", set())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_checkpoint("tiny", tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("error", [None, RuntimeError("no kernel")])
def test_layers_quantize_on_the_reference_while_the_kernels_warm(tiny_dir, monkeypatch,
                                                                  error):
    """While the warm-up thread runs, the driver quantizes (in its own thread) on the torch
    reference; once it is done, on the kernels; the load equals one without a warm-up,
    also when the warm-up fails (the real kernel would fail, typed, itself)."""
    release = threading.Event()
    handler = _Preparing(release, error)
    session = loadfsm.LoadSession(build_model("tiny"), quant="fp8", device="cpu")
    modes = []
    real = fp8.quantize_fp8_into
    monkeypatch.setattr(fp8, "quantize_fp8_into", lambda *a: (
        modes.append(getattr(fp8._THREAD, "reference", False)), real(*a))[1])
    session.driver.warmup = KernelWarmup([handler], session.quant, torch.device("cpu"))
    source = SafetensorsSource(tiny_dir)
    for count, (name, tensor) in enumerate(source.read(session.match(
            source.entries(), source.index()))):
        if count == 12:
            release.set()
            session.driver.warmup.wait()
        session.arrive(name, tensor)
    session.finish()
    source.close()
    assert handler.events[0] == ("start", "loadfsm-warmup")
    assert modes[0] is True and modes[-1] is False
    assert modes == sorted(modes, reverse=True)          # reference first, then kernels
    assert session.driver.warmup is None
    reference = build_model("tiny")
    loadfsm.load(reference, tiny_dir, quant="fp8", device="cpu")
    expected = reference.state_dict()
    for name, tensor in session.model.state_dict().items():
        other = expected[name]
        if tensor.dtype.itemsize == 1:
            tensor, other = tensor.view(torch.uint8), other.view(torch.uint8)
        assert torch.equal(tensor, other), name


def test_reference_kernels_hold_in_their_thread_only():
    seen = []
    with fp8.reference_kernels():
        thread = threading.Thread(target=lambda: seen.append(
            getattr(fp8._THREAD, "reference", False)))
        thread.start()
        thread.join()
        assert fp8._THREAD.reference is True
    assert seen == [False] and fp8._THREAD.reference is False


def test_no_warmup_thread_on_the_cpu():
    session = loadfsm.LoadSession(build_model("tiny"), quant="fp8", device="cpu")
    assert session.driver.warmup is None


def test_what_was_prepared_once_is_not_prepared_again(monkeypatch):
    """A second warm-up of the same handler kind, config and device starts no thread (the
    kernels stay ready for the process); a failed one is tried again."""
    release = threading.Event()
    release.set()
    failing = KernelWarmup([_Preparing(release, RuntimeError("no kernel"))], None,
                           torch.device("cpu"))
    failing.wait()
    handler = _Preparing(release)
    first = KernelWarmup([handler], None, torch.device("cpu"))
    first.wait()
    assert handler.events == [("start", "loadfsm-warmup"), ("done", None)]
    again = _Preparing(release)
    second = KernelWarmup([again], None, torch.device("cpu"))
    assert second.done() and again.events == []
    other_config = KernelWarmup([again], "fp8-block", torch.device("cpu"))
    other_config.wait()
    assert again.events[0] == ("start", "loadfsm-warmup")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_session_warms_its_fp8_kernels_once():
    session = loadfsm.LoadSession(build_model("tiny"), quant="fp8", device="cuda")
    assert session.driver.warmup is not None
    session.driver.warmup.wait()
    later = loadfsm.LoadSession(build_model("tiny"), quant="fp8", device="cuda")
    assert later.driver.warmup is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reference_kernels_keep_triton_out_on_cuda(monkeypatch):
    from loadfsm.quant import triton_fp8
    from loadfsm.quant.config import Fp8Config
    w = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    expected, expected_scale = fp8.quantize_fp8(w, Fp8Config())     # the kernel's result
    calls = []
    monkeypatch.setattr(triton_fp8, "quantize_into", lambda *a: calls.append(a))
    with fp8.reference_kernels():
        q, scale = fp8.quantize_fp8(w, Fp8Config())
    assert not calls
    assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(scale, expected_scale)


def test_a_push_waits_for_the_kernels_instead_of_the_reference(tiny_dir, monkeypatch):
    """A push runs again and again: its layers wait for a warm-up still running rather than
    quantize on the reference (a load does not wait)."""
    model = build_model("tiny")
    loadfsm.load(model, tiny_dir, quant="fp8", device="cpu")
    sync = loadfsm.WeightSync(model)
    release = threading.Event()
    handler = _Preparing(release)
    sync.session.driver.warmup = KernelWarmup([handler], sync.session.quant,
                                              torch.device("cpu"))
    modes = []
    real = fp8.quantize_fp8_into
    monkeypatch.setattr(fp8, "quantize_fp8_into", lambda *a: (
        modes.append((getattr(fp8._THREAD, "reference", False), len(handler.events))),
        real(*a))[1])
    threading.Timer(0.3, release.set).start()
    source = SafetensorsSource(tiny_dir)
    sync.push(source.read(None))
    source.close()
    assert modes and all(mode == (False, 2) for mode in modes)    # after "done", on kernels
    assert sync.session.driver.warmup is None
