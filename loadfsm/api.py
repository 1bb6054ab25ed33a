"""``loadfsm.load``: a model built on ``meta`` + a source -> a loaded model and a report."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .errors import LoadError, UnsupportedDeviceError
from .loading.drive import planned_entries, run
from .loading.prequantized import checkpoint_quant, trace_checkpoint_quant
from .loading.session import default_device
from .report import LoadReport
from .session import LoadSession
from .watchdog import Watchdog
from .sources.base import IteratorSource
from .sources.checkpoint_config import quantization_config
from .sources.checkpoint_files import refuse_overwrite
from .sources.dummy import DummySource
from .sources.safetensors_dir import SafetensorsSource

LOAD_FORMATS = ("auto", "safetensors", "dummy")


def load(model: nn.Module, source: str | Path | Iterable | None, *, quant=None,
         device=None, load_format: str = "auto", seed: int = 0, trace=None,
         strict: bool = True, max_in_flight: int = 2, progress: bool = False,
         watchdog: float | None = None) -> LoadReport:
    """Load weights into ``model`` layer by layer, quantizing each as it completes.

    Args:
        model: built under ``torch.device("meta")``; loaded in place (FP8 layers are
            swapped for their FP8 modules).
        source: a safetensors file or directory (index optional), an iterable of
            ``(name, tensor)``, or ``None`` with ``load_format="dummy"``.
        quant: ``None``, ``"fp8"`` (per-tensor), ``"fp8-channel"``, ``"fp8-block"``,
            ``"int8"`` (weight-only, per channel), or a config: ``Fp8Config``,
            ``Int8Config``, or a registered handler's own (README, "Writing a handler").
            A checkpoint already in FP8 (``weight_scale_inv`` / ``weight_scale`` tensors)
            loads as it is, in its own layout (README, "Pre-quantized checkpoints").
        device: target device, the best available when ``None``.
        load_format: ``"auto"``, ``"safetensors"`` or ``"dummy"`` (seeded random weights).
        seed: seed of the dummy format.
        trace: ``True`` (structlog events), a JSONL path, or ``None``.
        strict: raise on missing/unexpected tensors; else report them (``report.missing``,
            ``report.unexpected``) and log a warning. A layer left incomplete is never
            finalized: its parameters stay on ``meta`` (its module is not swapped) and its
            staging is freed. It stays META when the headers showed the gap before
            reading (a safetensors checkpoint), PARTIAL when an iterator fed it some
            pieces; ``report.layer_states`` says which.
        max_in_flight: warn once when more layers than this are partially loaded.
        progress: show a progress bar (tqdm) over layers.
        watchdog: seconds without an arrival before a ``load_stalled`` warning naming the
            layers in flight and the pieces each waits for (``loadfsm.watchdog``); off
            when ``None``.

    Returns:
        A ``LoadReport``.

    Raises:
        LoadError: a subclass naming the tensor, file and layer at fault.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    if device is not None and torch.device(device).type == "meta":
        raise UnsupportedDeviceError("cannot load weights onto the meta device; build the "
                                     "model on meta and load onto cpu or cuda")
    checkpoint = _checkpoint(source, load_format, device, trace)
    quant, differs = _checkpoint_quant(quant, checkpoint, source)
    bar = None
    session = LoadSession(model, quant=quant, device=device, trace=trace, strict=strict,
                          max_in_flight=max_in_flight,
                          on_layer_done=(lambda rec: bar.update()) if progress else None)
    trace_checkpoint_quant(session.tracer, session.quant, differs)
    bar = _progress_bar(progress, len(session.plan.layers))
    src = checkpoint or _open_source(session, source, load_format, seed)
    try:
        with Watchdog(session, watchdog, "load"):
            return run(session, src)
    finally:
        src.close()
        if bar is not None:
            bar.close()


def _checkpoint(source, load_format: str, device, trace) -> SafetensorsSource | None:
    """The checkpoint source of a path, its files resolved before the trace file is opened
    (so a trace naming one of them is refused, not truncated)."""
    if load_format == "dummy" or not isinstance(source, (str, Path)):
        return None
    checkpoint = SafetensorsSource(source, device=device if device is not None
                                   else default_device())
    refuse_overwrite(trace, checkpoint.inputs())
    return checkpoint


def _checkpoint_quant(quant, checkpoint: SafetensorsSource | None, source):
    """A checkpoint already in FP8 loads as it is (``loading.prequantized``). Headers or
    a config that cannot be read are left to ``run``, which traces the failure."""
    if checkpoint is None:
        return quant, None
    try:
        entries, config = checkpoint.entries(), quantization_config(source)
    except LoadError:
        return quant, None
    return checkpoint_quant(quant, entries, config)


def _open_source(session: LoadSession, source, load_format: str, seed: int):
    if load_format == "dummy" or (load_format == "auto" and source is None):
        if source is not None:
            raise ValueError("load_format='dummy' takes no source")
        return DummySource(planned_entries(session), device=session.device, seed=seed)
    if source is None:
        raise ValueError("source is None; pass a checkpoint path or load_format='dummy'")
    return IteratorSource(source)


def _progress_bar(enabled: bool, layers: int):
    """One bar per load, sized from the plan; on a terminal only (``disable=None``), so
    logs and pipes get no control characters."""
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=layers, unit="layer", desc="loading", leave=False, disable=None)
