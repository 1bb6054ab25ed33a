"""Handlers are chosen by module type from a registry keyed to the quant config: a loaded
model re-plans onto the handlers that installed its modules, with no arguments; a user
registers a handler from outside the package."""

import pytest
import torch
from torch import nn

import loadfsm
from loadfsm.handlers import Handler, Install, handler_for, installer_of, register_handler
from loadfsm.handlers.engine_fp8 import Fp8WeightsHandler
from loadfsm.handlers.fp8 import Fp8ExpertsHandler, Fp8LinearHandler
from loadfsm.handlers.kv_scales import KvScalesHandler
from loadfsm.handlers.registry import _BY_CONFIG
from loadfsm.quant.config import Fp8Config
from loadfsm.quant.experts import StackedExperts
from loadfsm.quant.linear import Fp8Linear, Fp8StackedExperts

FP8 = Fp8Config()


class UserFp8Linear(Fp8Linear):
    """A user's subclass of a kernel module, with no handler of its own."""


class UserLinear(nn.Linear):
    """A user's subclass of nn.Linear: its forward may differ, so FP8 does not claim it."""


def _linear(cls=Fp8Linear):
    return cls(16, 8, bias=False, config=FP8)


def _experts(cls):
    return cls(2, 16, 8, FP8)


@pytest.mark.parametrize("module, handler", [
    (_linear(), Fp8LinearHandler),
    (_experts(Fp8StackedExperts), Fp8ExpertsHandler),
    (_linear(UserFp8Linear), Fp8LinearHandler),
    (nn.Linear(16, 8), None),
], ids=["fp8-linear", "stacked-experts", "user-subclass", "plain-linear"])
def test_installer_is_the_nearest_declared_class(module, handler):
    """The nearest class in the module's hierarchy that a handler installs picks it."""
    found = installer_of(module)
    assert (found is None) if handler is None else isinstance(found, handler)


def test_hf_experts_kernel_goes_back_to_its_own_handler():
    """``Fp8Experts`` subclasses ``Fp8StackedExperts``; its nearest installer is the HF one."""
    pytest.importorskip("transformers")
    from loadfsm.integrations.hf_experts import Fp8Experts, HfExpertsFp8Handler
    assert type(installer_of(_experts(Fp8Experts))) is HfExpertsFp8Handler


@pytest.mark.parametrize("config", [None, FP8, Fp8Config(exclude=("*",))],
                         ids=["bf16", "fp8", "fp8-all-excluded"])
def test_a_kernel_module_goes_to_its_installer_whatever_the_config(config):
    """Re-planning needs no constructor arguments: the module's type decides."""
    assert type(handler_for("x", _linear(), config)) is Fp8LinearHandler


@pytest.mark.parametrize("name, module, config, expected", [
    ("model.q_proj", nn.Linear(4, 4), FP8, Fp8LinearHandler),
    ("model.q_proj", nn.Linear(4, 4), None, Handler),
    ("lm_head", nn.Linear(4, 4), FP8, Handler),                     # excluded by default
    ("model.q_proj", UserLinear(4, 4), FP8, Handler),                # exact type only
    ("model.experts", StackedExperts(2, 4, 4), FP8, Fp8ExpertsHandler),
    ("model.norm", nn.LayerNorm(4), FP8, Handler),
], ids=["linear", "bf16", "excluded", "subclass", "experts", "norm"])
def test_plain_modules_by_type_and_config(name, module, config, expected):
    assert type(handler_for(name, module, config)) is expected


def test_kv_scale_modules_take_their_handler_under_any_config():
    module = nn.Module()
    module.register_buffer("k_scale", torch.ones(()))
    module.register_buffer("v_scale", torch.ones(()))
    assert type(handler_for("attn", module, None)) is KvScalesHandler
    assert type(handler_for("attn", module, FP8)) is KvScalesHandler


def test_engine_modules_listing_fp8_weights_are_claimed_by_predicate():
    module = nn.Module()
    module.weight = nn.Parameter(torch.empty(4, 4))
    module.fp8_weights = ("weight",)
    assert type(handler_for("x", module, FP8)) is Fp8WeightsHandler
    assert type(handler_for("x", module, None)) is Handler


def test_registration_is_checked():
    with pytest.raises(TypeError):
        register_handler(Handler, modules=(nn.Linear,))            # a class, not an instance
    with pytest.raises(TypeError):
        register_handler(Handler(), modules=(int,))
    with pytest.raises(ValueError):
        register_handler(Handler())                                # matches nothing


class _Doubling(Handler):
    """A user's scheme: weights doubled at load (simple enough to check exactly)."""

    name = "doubling"

    def quantize(self, rec, config):
        return {attr: t * 2 for attr, t in rec.staging.items()}

    def install(self, rec, config):
        return Install(tensors=dict(rec.results))


class _Tagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(3, 3))


@pytest.fixture
def doubling():
    """A handler registered from outside the package for the duration of one test."""
    handler = register_handler(_Doubling(), modules=(_Tagged,))
    yield handler
    _BY_CONFIG[None] = [e for e in _BY_CONFIG[None] if e.handler is not handler]


def test_a_user_handler_registered_from_outside_loads_its_modules(doubling):
    with torch.device("meta"):
        model = nn.Sequential(_Tagged(), nn.Linear(3, 3))
    weights = {"0.weight": torch.arange(9.0).reshape(3, 3), "1.weight": torch.ones(3, 3),
               "1.bias": torch.zeros(3)}
    loadfsm.load(model, list(weights.items()), device="cpu")
    assert torch.equal(model[0].weight, weights["0.weight"] * 2)
    assert torch.equal(model[1].weight, weights["1.weight"])
