"""Handlers: pluggable behaviour on layer transitions, registered by name.

A handler claims layers and is called by the session on their transitions:
``materialize`` (META -> PARTIAL), ``defaults`` (optional pieces absent),
``quantize`` (COMPLETE -> QUANTIZED), ``install`` or ``commit``
(QUANTIZED -> FINALIZED; ``commit`` copies into the live tensors on reload).
Handlers never read files and never keep per-layer state of their own: what a
layer needs lives on its ``LayerRecord``. NaN/Inf are not a handler's concern: the
session records every piece's max|x| at arrival and verifies them in batches.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
from torch import nn

from ..errors import ShapeMismatchError
from ..ledger import nbytes


if TYPE_CHECKING:
    from ..layer import LayerRecord
    from ..session import LoadSession

HANDLERS: dict[str, type["Handler"]] = {}


def register_handler(name: str) -> Callable[[type["Handler"]], type["Handler"]]:
    """Class decorator that registers a ``Handler`` subclass under ``name``."""

    def wrap(cls: type["Handler"]) -> type["Handler"]:
        if not (isinstance(cls, type) and issubclass(cls, Handler)):
            raise TypeError(f"{cls!r} is not a Handler subclass")
        if name in HANDLERS:
            raise ValueError(f"handler {name!r} is already registered")
        cls.name = name
        HANDLERS[name] = cls
        return cls

    return wrap


class Handler:
    """Default behaviour: load tensors as they are (no quantization)."""

    name: ClassVar[str] = "base"
    # Kernel module classes this handler puts into a model: re-planning a loaded model
    # gives such a module back to this handler (``handlers.kernels``). Declared, not inherited.
    installs: ClassVar[tuple[type[nn.Module], ...]] = ()

    def __init__(self, session: "LoadSession"):
        # Weak: the session holds its handlers, and a cycle would keep its tensors alive
        # until the garbage collector runs.
        self._session = weakref.ref(session)

    @property
    def session(self) -> "LoadSession":
        return self._session()

    def claims(self, layer_name: str, module: nn.Module) -> bool:
        return False

    def materialize(self, rec: "LayerRecord") -> dict[str, torch.Tensor]:
        """Staging tensors on the target device. Padding is zero-filled, never garbage."""
        device = self.session.device
        return {attr: (torch.zeros if slot.padded else torch.empty)(
                    slot.shape, dtype=slot.dtype, device=device)
                for attr, slot in rec.slots.items()}

    def defaults(self, rec: "LayerRecord", pieces: list) -> None:
        """Fill optional pieces the checkpoint did not carry."""
        raise ValueError(f"{rec.name} declares optional pieces, but its handler "
                         f"{self.name!r} has no defaults for them")

    # Whether ``quantize`` returns new tensors rather than the staging tensors themselves.
    makes_new_tensors: ClassVar[bool] = False

    def quantize(self, rec: "LayerRecord") -> dict[str, torch.Tensor]:
        """Results kept after staging is freed; here the staging tensors themselves."""
        return dict(rec.staging)

    def install(self, rec: "LayerRecord") -> None:
        """First load: put the results into the model."""
        for attr, tensor in rec.results.items():
            self.session.place(rec, attr, tensor)

    def live_tensors(self, rec: "LayerRecord") -> dict[str, torch.Tensor]:
        """The tensors the forward pass (and captured CUDA graphs) read."""
        return {attr: getattr(rec.module, attr) for attr in rec.slots}

    def commit(self, rec: "LayerRecord") -> None:
        """Reload: copy the new results into the live tensors, keeping their storage.

        Every pair is checked before the first copy, so a mismatch leaves the layer
        wholly old. The copies run smallest first, the largest last; the live values
        of all but the last are kept aside, so an exception during the copies puts the
        old tensors back (the session holds SIGINT over the commit on the main thread).
        """
        live = self.live_tensors(rec)
        for attr, tensor in rec.results.items():
            target = live.get(attr)
            if target is None or target.shape != tensor.shape or target.dtype != tensor.dtype:
                raise ShapeMismatchError(
                    f"new {attr} {tuple(tensor.shape)} {tensor.dtype} does not fit the live "
                    f"tensor {None if target is None else (tuple(target.shape), target.dtype)}",
                    tensor=rec.slots[attr].full_name if attr in rec.slots else attr,
                    layer=rec.name)
        pairs = sorted(((live[attr].data, new) for attr, new in rec.results.items()),
                       key=lambda pair: pair[1].numel())
        kept = [target.clone() for target, _ in pairs[:-1]]
        ledger, kept_bytes = self.session.ledger, sum(nbytes(t) for t in kept)
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
