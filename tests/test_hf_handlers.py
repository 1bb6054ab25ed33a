"""Handler choice by kernel module type: a loaded model re-plans onto the handlers that
installed its modules, whatever the new session was told."""

import pytest
from torch import nn

pytest.importorskip("transformers")
from loadfsm.handlers.engine_fp8 import EngineFp8Handler  # noqa: E402
from loadfsm.handlers.fp8 import Fp8Handler  # noqa: E402
from loadfsm.handlers.kernels import installer_of, installers  # noqa: E402
from loadfsm.integrations.hf_experts import Fp8Experts, HfExpertsFp8Handler  # noqa: E402
from loadfsm.quant.config import Fp8Config  # noqa: E402
from loadfsm.quant.linear import Fp8Linear, Fp8StackedExperts  # noqa: E402


class UserFp8Linear(Fp8Linear):
    """A user's subclass of a kernel module, with no handler of its own."""


def _linear(cls=Fp8Linear):
    return cls(16, 8, bias=False, config=Fp8Config())


def _experts(cls):
    return cls(2, 16, 8, Fp8Config())


@pytest.mark.parametrize("module, handler", [
    (_linear(), Fp8Handler),
    (_experts(Fp8StackedExperts), Fp8Handler),
    (_experts(Fp8Experts), HfExpertsFp8Handler),
    (_linear(UserFp8Linear), Fp8Handler),
    (nn.Linear(16, 8), None),
], ids=["fp8-linear", "stacked-experts", "hf-experts", "user-subclass", "plain-linear"])
def test_installer_is_the_nearest_declared_class(module, handler):
    """The nearest class in the module's hierarchy that a handler installs picks it."""
    assert installer_of(module) is handler


def test_installs_is_declared_not_inherited():
    """A handler subclass that installs nothing does not inherit its base's kernels."""
    assert "installs" not in EngineFp8Handler.__dict__
    assert installer_of(_linear()) is not EngineFp8Handler


def test_installers_of_a_model_in_order_without_repeats():
    """A model's installers: each handler once, in model order."""
    model = nn.Sequential(_experts(Fp8Experts), _linear(), _linear(), nn.LayerNorm(4))
    assert installers(model) == ("hf_experts_fp8", "fp8")


class _Session:
    """What a handler's ``claims`` reads of its session: the FP8 config."""

    quant = Fp8Config(exclude=("*",))


@pytest.mark.parametrize("module", [_linear(), _experts(Fp8Experts)], ids=["linear", "experts"])
def test_only_the_installer_claims_its_kernel(module):
    """Of the two FP8 handlers, only the installer claims a kernel module, excluded or not."""
    session = _Session()
    claims = {h.name for h in (Fp8Handler, HfExpertsFp8Handler) if h(session).claims("x", module)}
    assert claims == {installer_of(module).name}
