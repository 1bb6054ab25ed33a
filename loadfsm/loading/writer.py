"""The model writer: the only code that changes the ``nn.Module`` being loaded.

Handlers say what a layer becomes (``handlers.base.Install``); the writer puts it in,
under every name the layer's tensors and module have (tied weights, modules shared by
two parents), and copies a reload's results into the live tensors in place. Engines
whose ``meta``-built modules hold non-persistent buffers (a rotary cache) get them
computed at the end of a load (``register_buffer_init``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import ShapeMismatchError
from ..handlers.base import Install
from ..layer import LayerRecord
from ..ledger import MemoryLedger, nbytes

_BUFFER_INITS: dict[type, Callable[[nn.Module, torch.device], None]] = {}
_PLAIN = (torch.Tensor, nn.Parameter)


def register_buffer_init(cls: type[nn.Module]):
    """Decorator: ``fn(module, device)`` computes the non-persistent buffers of ``cls``
    modules built on ``meta`` (an engine class's rotary cache), as their own
    ``compute_buffers(device)`` method would."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"{cls!r} is not an nn.Module subclass")

    def wrap(fn):
        _BUFFER_INITS[cls] = fn
        return fn

    return wrap


def buffer_init(module: nn.Module) -> Callable[[torch.device], None] | None:
    """``module``'s buffer computation: its own ``compute_buffers`` or a registered one."""
    own = getattr(module, "compute_buffers", None)
    if callable(own):
        return own
    fn = next((_BUFFER_INITS[k] for k in type(module).__mro__ if k in _BUFFER_INITS), None)
    return None if fn is None else lambda device: fn(module, device)


class ModelWriter:
    """Installs layers into ``model`` and commits reloads into its live tensors."""

    def __init__(self, model: nn.Module):
        self.model = model

    def install(self, rec: LayerRecord, install: Install) -> None:
        """First load: apply what the layer's handler returned."""
        if install.module is not None:
            self.replace_module(rec, install.module)
        for attr, tensor in install.tensors.items():
            self.place(rec, attr, tensor)
        for attr, value in install.attrs.items():
            setattr(rec.module, attr, value)

    def place(self, rec: LayerRecord, attr: str, tensor: torch.Tensor) -> None:
        """Set a tensor on the layer's module and on every module tied to it. A tensor
        that is no planned slot (an FP8 weight's scale) becomes a frozen parameter."""
        slot = rec.slots.get(attr)
        if slot is None:
            setattr(rec.module, attr, nn.Parameter(tensor, requires_grad=False))
            return
        if slot.is_buffer:
            value = tensor
        else:
            old = rec.module._parameters.get(attr)
            grad = bool(old is not None and old.requires_grad and tensor.is_floating_point())
            value = nn.Parameter(tensor, requires_grad=grad)
        for full in [slot.full_name, *slot.aliases]:
            self.set_tensor(full, value, slot.is_buffer)

    def set_tensor(self, full_name: str, value: torch.Tensor, is_buffer: bool) -> None:
        """Set the parameter (or buffer) called ``full_name`` in the model to ``value``."""
        owner, _, name = full_name.rpartition(".")
        module = _submodule(self.model, owner) if owner else self.model
        if is_buffer:
            module._buffers[name] = value
        elif isinstance(value, nn.Parameter):
            module._parameters[name] = value
        else:
            setattr(module, name, value)

    def replace_module(self, rec: LayerRecord, new: nn.Module) -> None:
        """Swap a layer's module for its kernel form, under every name it is registered at."""
        for name in rec.names or [rec.name]:
            parent_name, _, child = name.rpartition(".")
            parent = _submodule(self.model, parent_name) if parent_name else self.model
            setattr(parent, child, new)
        rec.module = new

    def commit(self, rec: LayerRecord, ledger: MemoryLedger) -> None:
        """Reload: copy the layer's results into its live tensors, keeping their storage
        (every ``data_ptr``, shape, stride and dtype), so captured CUDA graphs stay valid.

        Every pair is checked before the first copy, so a mismatch leaves the layer
        wholly old. The copies run smallest first, the largest last; the live values of
        all but the last are kept aside, so an exception during the copies puts the old
        tensors back (the caller holds SIGINT over the commit).
        """
        live = rec.handler.live_tensors(rec)
        pairs = []
        for attr, tensor in rec.results.items():
            target = live.get(attr)
            if target is None or target.shape != tensor.shape or target.dtype != tensor.dtype:
                raise ShapeMismatchError(
                    f"new {attr} {tuple(tensor.shape)} {tensor.dtype} does not fit the live "
                    f"tensor {None if target is None else (tuple(target.shape), target.dtype)}",
                    tensor=rec.slots[attr].full_name if attr in rec.slots else attr,
                    layer=rec.name)
            pairs.append((_writable(target), tensor))
        if len(pairs) > 1:
            pairs.sort(key=_new_numel)
        if torch.is_grad_enabled():
            with torch.no_grad():
                _copy_in(pairs, ledger)
        else:
            _copy_in(pairs, ledger)

    def compute_buffers(self, device: torch.device) -> None:
        """Non-persistent buffers still on ``meta``, computed by their module's init."""
        for module in self.model.modules():
            compute = buffer_init(module)
            if compute is not None and any(b is not None and b.is_meta
                                           for b in module._buffers.values()):
                compute(device)


def _writable(live: torch.Tensor) -> torch.Tensor:
    """What the commit copies into: a plain tensor or parameter itself, with autograd off
    (``.data`` would be one more op per tensor, and a push commits every layer); the
    ``.data`` of an inference tensor (made under ``torch.inference_mode``: in place only
    through it) or of a tensor subclass (its own ``copy_`` left out, as before)."""
    if type(live) in _PLAIN and not live.is_inference():
        return live
    return live.data


def _new_numel(pair: tuple[torch.Tensor, torch.Tensor]) -> int:
    return pair[1].numel()


def _copy_in(pairs: list[tuple[torch.Tensor, torch.Tensor]], ledger: MemoryLedger) -> None:
    """Copy each ``(live, new)`` pair, the largest last; the live values of all but the
    last are kept aside and put back if a copy raises."""
    if len(pairs) == 1:                  # nothing to put back: the copy is whole or not
        pairs[0][0].copy_(pairs[0][1])
        return
    kept = [target.clone() for target, _ in pairs[:-1]]
    kept_bytes = sum(nbytes(t) for t in kept)
    ledger.add_staging(kept_bytes)
    done = 0
    try:
        for target, new in pairs:
            target.copy_(new)
            done += 1
    except BaseException:
        for (target, _), old in zip(pairs[:done], kept):
            target.copy_(old)
        raise
    finally:
        ledger.free_staging(kept_bytes)


def _submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` through the children's registries (``get_submodule``
    makes a ``getattr`` and a ``hasattr`` per level; an install does this per layer)."""
    module = model
    for part in path.split("."):
        child = module._modules.get(part)
        if child is None:                  # not a registered child: as torch finds it
            return model.get_submodule(path)
        module = child
    return module
