"""Which config loads a checkpoint that is already FP8: the checkpoint's layout, read
from its headers and ``config.json``, reconciled with what the user asked
(``quant.fp8_layout``). ``loadfsm.load`` and ``loadfsm.hf.from_pretrained`` call it."""

from __future__ import annotations

from ..plan import TensorEntry
from ..quant.config import Fp8Config, quant_name, resolve_quant
from ..quant.fp8_layout import Fp8CheckpointConfig, detect_fp8_checkpoint, reconcile
from ..trace import Tracer


def checkpoint_quant(quant, entries: dict[str, TensorEntry],
                     quantization_config: dict | None) -> tuple[object, dict | None]:
    """``(config, differs)``: the config to load ``entries`` with, and, when the
    checkpoint is FP8 at another granularity than ``quant`` asked, what to warn."""
    asked = resolve_quant(quant)
    hint = asked.block_size if isinstance(asked, Fp8Config) else None
    layout = detect_fp8_checkpoint(entries, quantization_config, hint)
    if layout is None:
        return asked, None
    return reconcile(asked, layout)


def trace_checkpoint_quant(tracer: Tracer, config, differs: dict | None) -> None:
    """One event naming the checkpoint's FP8 layout; a warning when the user asked for
    another granularity (which was kept or requantized, ``differs["action"]``)."""
    if isinstance(config, Fp8CheckpointConfig):
        tracer.event("prequantized_checkpoint", granularity=config.granularity,
                     scale_name=config.scale_name, kernel=quant_name(config.kernel),
                     input_scales=config.input_scale_shape is not None)
    if differs is not None:
        tracer.warning("checkpoint_quant_differs", **differs)
