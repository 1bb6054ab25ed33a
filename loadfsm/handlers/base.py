"""Handlers: what a layer's tensors become between COMPLETE and FINALIZED.

A handler is stateless: one instance serves every layer and every session it is chosen
for (``handlers.registry``). What a layer needs lives on its ``LayerRecord``; what a load
needs (the device, the quantization config) is passed in. A handler never mutates the
``nn.Module``: ``install`` returns an ``Install`` that the model writer
(``loading.writer``) applies, and a reload's results are copied into the live tensors by
the writer too. Handlers never read files, and NaN/Inf are not their concern (the
finiteness batch verifies every piece). Lifecycle: ARCHITECTURE.md.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


WHOLE_MATRIX = 0        # ``scale_checked``: one scale per [N, K] matrix


@dataclass(frozen=True)
class Install:
    """What a first load puts into the model for one layer.

    Args:
        module: a kernel module that replaces the layer's module under every name.
        tensors: attribute -> tensor, set on the (new) module, and every module tied to
            it, as the slot was planned: a parameter or a buffer; a tensor that is no
            planned slot (an FP8 weight's scale) becomes a frozen parameter.
        attrs: plain attributes set on the module beside ``tensors`` (an engine's
            ``quant_method``, ``input_scale = None``).
    """

    module: nn.Module | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)


class Handler:
    """Loads tensors as they are (no quantization). Subclass and register to add a scheme."""

    name: ClassVar[str] = "passthrough"
    # Kernel module classes this handler's ``install`` puts into a model: re-planning a
    # loaded model gives such a module back to this handler (``registry.installer_of``).
    installs: ClassVar[tuple[type[nn.Module], ...]] = ()
    # Whether ``quantize`` returns new tensors rather than the staging tensors themselves.
    makes_new_tensors: ClassVar[bool] = False

    def plan_slots(self, name: str, module: nn.Module, config,
                   pieces: dict[str, list]) -> tuple[dict, list] | None:
        """What a checkpoint feeds ``module`` (registered at ``name``) under ``config``
        when that is not the module's own tensors (a pre-quantized checkpoint: its FP8
        weight and scale): ``({attr: (shape, dtype)}, extra pieces)``, or ``None`` for
        the module's own. ``pieces``: attr -> the pieces the model names for it."""
        return None

    def materialize(self, rec, device: torch.device) -> dict[str, torch.Tensor]:
        """Staging tensors on the target device. Padding is zero-filled, never garbage."""
        return {attr: (torch.zeros if slot.padded else torch.empty)(
                    slot.shape, dtype=slot.dtype, device=device)
                for attr, slot in rec.slots.items()}

    def defaults(self, rec, pieces: list) -> None:
        """Fill optional pieces the checkpoint did not carry, in ``rec.staging``."""
        raise ValueError(f"{rec.name} declares optional pieces, but its handler "
                         f"{self.name!r} has no defaults for them")

    def scale_checked(self, rec, config) -> dict[str, int]:
        """Weights whose ``{attr}_scale`` result is NaN/Inf exactly where the weight is,
        so the finiteness batch reads it instead of reducing the weight again: attr ->
        weight rows per scale row (1: a scale per row, a block's height, or
        ``WHOLE_MATRIX``: one scale per matrix). None here: inputs are checked."""
        return {}

    def prepare(self, config, device: torch.device) -> None:
        """Get ready to quantize on ``device`` (compile or load kernels). Runs once per
        load in a background thread while the first tensors are read. Nothing to
        prepare here."""

    def unprepared(self) -> contextlib.AbstractContextManager:
        """Where the driver runs ``quantize`` while ``prepare`` still runs in its thread:
        a way that needs nothing ``prepare`` readies (FP8: the torch reference)."""
        return contextlib.nullcontext()

    def quantize(self, rec, config) -> dict[str, torch.Tensor]:
        """Results kept after staging is freed; here the staging tensors themselves."""
        return dict(rec.staging)

    def install(self, rec, config) -> Install:
        """First load: what to put into the model."""
        return Install(tensors=dict(rec.results))

    def live_tensors(self, rec) -> dict[str, torch.Tensor]:
        """The tensors the forward pass (and captured CUDA graphs) read; a reload's
        results are copied into these, attribute by attribute."""
        return {attr: getattr(rec.module, attr) for attr in rec.slots}


class WeightQuantizer(Handler, abc.ABC):
    """Quantizes the layer's ``weight_attrs`` with ``quantize_weight`` (each weight gets a
    ``{attr}_scale`` beside it); every other tensor (bias) passes as it is. A scheme that
    quantizes weights one by one subclasses this and says how."""

    makes_new_tensors = True
    weights: ClassVar[tuple[str, ...]] = ()

    def weight_attrs(self, rec) -> tuple[str, ...]:
        return self.weights

    @abc.abstractmethod
    def quantize_weight(self, tensor: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
        """``(quantized, scale)`` of one full-precision weight."""

    def quantize(self, rec, config) -> dict[str, torch.Tensor]:
        quantized = self.weight_attrs(rec)
        results = {}
        for attr, tensor in rec.staging.items():
            if attr in quantized:
                results[attr], results[f"{attr}_scale"] = self.quantize_weight(tensor, config)
            else:
                results[attr] = tensor
        return results

    def live_tensors(self, rec) -> dict[str, torch.Tensor]:
        return own_parameters(rec.module)


def own_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s own parameters by attribute, as ``named_parameters(recurse=False)``
    gives them, read from the registry without that generator (a push asks per layer)."""
    return {attr: p for attr, p in module._parameters.items() if p is not None}
