"""What a push's commit writes into: the live tensors as the model holds them, with no
view made per tensor (an op each on the GPU), whatever their autograd state."""

import torch

import loadfsm
from loadfsm.testing import build_model, reference_state_dict
from checks import addresses, same
from tiny_models import SMALL


def _fresh(seed):
    model = build_model(SMALL)
    loadfsm.load(model, reference_state_dict(SMALL, seed).items(), quant="fp8", device="cpu")
    return model.state_dict()


def test_push_commits_into_a_model_loaded_under_inference_mode():
    """A model loaded under ``torch.inference_mode`` (inference tensors: written in place
    only through ``.data`` outside it) takes a push made outside it, in place."""
    model = build_model(SMALL)
    with torch.inference_mode():
        loadfsm.load(model, reference_state_dict(SMALL, 0).items(), quant="fp8",
                     device="cpu")
    where = addresses(model)
    loadfsm.WeightSync(model).push(reference_state_dict(SMALL, 1).items())
    expected = _fresh(1)
    assert all(same(t, expected[n]) for n, t in model.state_dict().items())
    assert addresses(model) == where


def test_push_with_grad_enabled_leaves_trainable_parameters_trainable():
    """Parameters that require grad (the norms of a model loaded with grad enabled) take
    a push under grad mode with no autograd error and keep ``requires_grad``."""
    model = build_model(SMALL)
    loadfsm.load(model, reference_state_dict(SMALL, 0).items(), quant="fp8", device="cpu")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    with torch.enable_grad():
        loadfsm.WeightSync(model).push(reference_state_dict(SMALL, 1).items())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    expected = _fresh(1)
    assert all(same(t, expected[n]) for n, t in model.state_dict().items())
