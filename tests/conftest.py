"""Shared helpers of the reliability tests: bitwise comparison, per-layer verdicts, and
fault injection (a failing ``Tensor.copy_``, a trace file that fills up)."""

from __future__ import annotations

import errno
import io
import signal
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

import loadfsm.trace


def bits(tensor):
    return tensor.detach().reshape(-1).view(torch.uint8)


def same(a, b):
    return (a.dtype == b.dtype and a.shape == b.shape and not a.is_meta and not b.is_meta
            and torch.equal(bits(a), bits(b)))


def snapshot(model):
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def addresses(model):
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {name: (t.data_ptr(), t.shape, t.stride(), t.dtype) for name, t in tensors.items()}


def layer_verdicts(model, old, new):
    """Per layer (module name): {'old'}, {'new'} or {'old', 'new'} (both alike).

    Fails when a layer mixes old and new tensors or matches neither."""
    verdict = {}
    for name, tensor in model.state_dict().items():
        kinds = {k for k, ref in (("old", old), ("new", new)) if same(tensor, ref[name])}
        assert kinds, f"{name} is neither old nor new"
        layer = name.rpartition(".")[0]
        verdict[layer] = verdict.get(layer, kinds) & kinds
        assert verdict[layer], f"layer {layer} mixes old and new tensors"
    return verdict


class CopyFault:
    """Within the block, the ``at``-th ``Tensor.copy_`` call injects ``kind``:
    ``"sigint"`` (a real SIGINT, delivered where Python next checks for signals),
    ``"keyboard"`` (KeyboardInterrupt raised right there, as off the main thread),
    ``"raise"`` (RuntimeError right there); nothing for another kind. With ``into``
    (a set of ``data_ptr``s), only copies into those tensors are counted."""

    def __init__(self, kind: str, at: int, into=None):
        self.kind, self.at, self.into, self.calls = kind, at, into, 0

    def __enter__(self):
        real = self._real = torch.Tensor.copy_

        def copy_(tensor, src, *args, **kwargs):
            if self.into is not None and tensor.data_ptr() not in self.into:
                return real(tensor, src, *args, **kwargs)
            self.calls += 1
            if self.calls == self.at:
                if self.kind == "sigint":
                    signal.raise_signal(signal.SIGINT)
                elif self.kind == "keyboard":
                    raise KeyboardInterrupt
                elif self.kind == "raise":
                    raise RuntimeError("injected copy failure")
            return real(tensor, src, *args, **kwargs)

        torch.Tensor.copy_ = copy_
        return self

    def __exit__(self, *exc):
        torch.Tensor.copy_ = self._real


class FullDisk(io.StringIO):
    """A trace file whose ``fail_after``-th write fails as a full disk does."""

    def __init__(self, fail_after: int):
        super().__init__()
        self.writes, self.fail_after = 0, fail_after

    def write(self, text):
        self.writes += 1
        if self.writes >= self.fail_after:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(text)


@contextmanager
def full_disk(fail_after: int):
    """Within the block, every trace file loadfsm opens is a ``FullDisk``."""
    loadfsm.trace.open = lambda *args, **kwargs: FullDisk(fail_after)
    try:
        yield
    finally:
        del loadfsm.trace.open


@pytest.fixture(scope="session")
def kit():
    """The helpers above, for test modules (which never import each other)."""
    return SimpleNamespace(bits=bits, same=same, snapshot=snapshot, addresses=addresses,
                           layer_verdicts=layer_verdicts, CopyFault=CopyFault,
                           FullDisk=FullDisk, full_disk=full_disk)
