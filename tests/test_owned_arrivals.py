"""A source that hands its tensors over (``owned_arrivals``): in a first load, a tensor
that is the whole of a one-slot layer becomes that layer's storage instead of being
copied; anything else is copied as from any source. Nothing else changes."""

import pytest
import torch

import loadfsm
from loadfsm.loading.drive import run
from loadfsm.sources.safetensors_dir import SafetensorsSource
from loadfsm.testing import build_model, reference_state_dict, write_checkpoint


class _HandingOver:
    """The checkpoint's tensors, each a new tensor the consumer may keep."""

    def __init__(self, path, owned: bool):
        self._inner, self.owned_arrivals, self.yielded = SafetensorsSource(path), owned, {}

    def entries(self):
        return self._inner.entries()

    def index(self):
        return self._inner.index()

    def file_of(self, name):
        return self._inner.file_of(name)

    def close(self):
        self._inner.close()

    def read(self, order):
        for name, tensor in self._inner.read(order):
            tensor = self.yielded[name] = tensor.clone()
            yield name, tensor


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_checkpoint("tiny", tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("quant", [None, "fp8"])
@pytest.mark.parametrize("owned", [True, False])
def test_handed_over_whole_tensors_become_the_layer(tiny_dir, quant, owned):
    reference = build_model("tiny")
    loadfsm.load(reference, tiny_dir, quant=quant, device="cpu")
    source = _HandingOver(tiny_dir, owned)
    session = loadfsm.LoadSession(build_model("tiny"), quant=quant, device="cpu")
    report = run(session, source)
    source.close()
    model = session.model
    norm = model.get_submodule("model.norm").weight
    assert (norm.data_ptr() == source.yielded["model.norm.weight"].data_ptr()) is owned
    fused = model.get_submodule("model.layers.0.self_attn.qkv_proj")
    pieces = [source.yielded[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]
    assert all(fused.weight.data_ptr() != t.data_ptr() for t in pieces)   # fused: copied
    # a handed-over piece copied into its layer is freed at once, a kept one is not
    assert all((t.untyped_storage().nbytes() == 0) is owned for t in pieces)
    assert source.yielded["model.norm.weight"].untyped_storage().nbytes() > 0
    expected = reference.state_dict()
    for name, tensor in model.state_dict().items():
        other = expected[name]
        if tensor.dtype.itemsize == 1:
            tensor, other = tensor.view(torch.uint8), other.view(torch.uint8)
        assert torch.equal(tensor, other), name
    assert report.peak_bytes <= report.final_bytes + report.largest_layer_bytes


def test_a_cuda_session_compares_tensors_on_the_indexed_device(monkeypatch):
    """``device="cuda"`` aliases tensors on ``cuda:N`` (the current GPU): compared as
    given, no tensor would ever be on it and every arrival would be copied."""
    from loadfsm.loading.driver import indexed
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert indexed(torch.device("cuda")) == torch.device("cuda", 3)
    assert indexed(torch.device("cuda:1")) == torch.device("cuda", 1)
    assert indexed(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_push_on_cuda_uses_whole_fp8_weights_as_staging():
    """A session made with ``device="cuda"`` aliases the trainer's ``cuda:0`` tensors."""
    model = build_model("tiny")
    loadfsm.load(model, reference_state_dict("tiny").items(), quant="fp8", device="cuda")
    sync = loadfsm.WeightSync(model)
    aliased = []
    real = sync.session.driver._materialize
    sync.session.driver._materialize = lambda rec, alias=None: (
        aliased.append(rec.name) if alias is not None else None, real(rec, alias))[1]
    sync.push((n, t.cuda()) for n, t in reference_state_dict("tiny", 1).items())
    assert "model.layers.0.self_attn.o_proj" in aliased
