"""``loadfsm plan``: what a load would do, from the checkpoint's headers alone.

No tensor data is read: the session plans on ``meta`` (L1), matches the headers (L2,
non-strict, so every gap is listed), and each layer's handler quantizes ``meta``
staging, which gives the exact shapes and dtypes of the final tensors without a byte.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .quant.config import quant_name
from .ledger import nbytes
from .loading.prequantized import checkpoint_quant
from .session import LoadSession
from .sources.checkpoint_config import quantization_config
from .sources.safetensors_dir import SafetensorsSource


@dataclass
class LayerPlan:
    name: str
    handler: str
    pieces: int                 # pieces the layer expects
    in_checkpoint: int          # of those, how many the headers list
    staging_bytes: int          # full-precision bytes while it loads
    final_bytes: int            # its tensors once loaded (0 if it cannot complete)


@dataclass
class CheckpointPlan:
    path: str
    quant: str | None
    layers: list[LayerPlan]
    missing: dict[str, list[str]] = field(default_factory=dict)   # layer -> names absent
    unexpected: list[str] = field(default_factory=list)
    bytes_to_read: int = 0
    final_bytes: int = 0
    largest_layer_bytes: int = 0

    @property
    def memory_bound_bytes(self) -> int:
        """Invariant 1: a load holds at most the final model plus the layer in flight."""
        return self.final_bytes + self.largest_layer_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "memory_bound_bytes": self.memory_bound_bytes}


def plan_checkpoint(path: str | Path, *, model: str | None = None, hf: bool = False,
                    quant: str | None = "fp8") -> CheckpointPlan:
    """Plan a load of ``path`` into reference model ``model`` (or, with ``hf``, the
    transformers model its ``config.json`` names) without reading tensor data.

    Raises:
        LoadError: a header is corrupt, or a tensor's shape or dtype does not fit.
    """
    source = SafetensorsSource(path, device="meta")
    try:
        session, entries = _session(path, model, hf, quant, source.entries())
        order = session.match(entries, source.index())                          # L1, L2
    finally:
        source.close()
    layers, missing = [], {}
    for rec in session.plan.layers.values():
        absent = sorted(n for n, p in rec.pieces.items() if n not in entries and not p.optional)
        if absent:
            missing[rec.name] = absent
        staging = sum(s.numel * s.dtype.itemsize for s in rec.slots.values())
        layers.append(LayerPlan(rec.name, type(rec.handler).__name__, len(rec.pieces),
                                sum(n in entries for n in rec.pieces), staging,
                                0 if absent else _final_bytes(rec, session.quant)))
    return CheckpointPlan(
        str(path), quant_name(session.quant), layers, missing=missing,
        unexpected=sorted(session.driver.unexpected),
        bytes_to_read=sum(entries[n].nbytes for n in order),
        final_bytes=sum(layer.final_bytes for layer in layers),
        largest_layer_bytes=max((layer.staging_bytes for layer in layers), default=0))


def _final_bytes(rec, config) -> int:
    """The handler's output for ``meta`` staging: exact sizes, no data."""
    rec.staging = rec.handler.materialize(rec, torch.device("meta"))
    try:
        return sum(nbytes(t) for t in rec.handler.quantize(rec, config).values())
    finally:
        rec.staging = {}


def _session(path, model, hf, quant, entries) -> tuple[LoadSession, dict]:
    """The session ``load`` (or ``hf.from_pretrained``, steps H1, H2) would run, on meta,
    and the header entries it would see."""
    config = quantization_config(path)         # a checkpoint already in FP8 loads as it is
    if not hf:
        from .testing import build_model
        quant, _ = checkpoint_quant(quant, entries, config)
        return LoadSession(build_model(model), quant=quant, device="meta",
                           strict=False), entries
    from .integrations.hf import build_meta_model, hf_quant, plan_session
    quant, _ = checkpoint_quant(hf_quant(quant), entries, config)
    session, ignored = plan_session(build_meta_model(path), entries, quant,
                                    device="meta", strict=False)
    return session, {n: e for n, e in entries.items() if n not in ignored}


def format_plan(plan: CheckpointPlan, top: int = 10) -> str:
    """A table of the largest layers, then the totals and every gap."""
    mb = 2 ** 20
    lines = [f"{plan.path}: {len(plan.layers)} layers, quant={plan.quant}",
             f"{'layer':48} {'handler':20} {'pieces':>7} {'staging MB':>11} {'final MB':>9}"]
    for layer in sorted(plan.layers, key=lambda l: -l.staging_bytes)[:top]:
        lines.append(f"{layer.name:48} {layer.handler:20} "
                     f"{layer.in_checkpoint:>3}/{layer.pieces:<3} "
                     f"{layer.staging_bytes / mb:>11.2f} {layer.final_bytes / mb:>9.2f}")
    if len(plan.layers) > top:
        lines.append(f"... {len(plan.layers) - top} more (--top, --json)")
    lines += [f"bytes to read: {plan.bytes_to_read / mb:.2f} MB",
              f"expected final size: {plan.final_bytes / mb:.2f} MB",
              f"memory bound (final + largest layer): {plan.memory_bound_bytes / mb:.2f} MB"]
    for layer, names in plan.missing.items():
        lines.append(f"missing: {layer}: {', '.join(names)}")
    if plan.unexpected:
        lines.append(f"unexpected: {', '.join(plan.unexpected)}")
    return "\n".join(lines)
