"""Driving a session from a source: headers matched, tensors read in layer order."""

from __future__ import annotations

from ..plan import TensorEntry, expected_shape
from ..report import LoadReport
from ..sources.base import Source
from .session import LoadSession


def run(session: LoadSession, source: Source) -> LoadReport:
    """Drive ``session`` from ``source`` to its report."""
    session.file_of = source.file_of
    session.driver.owned_arrivals = getattr(source, "owned_arrivals", False)
    try:
        entries = source.entries()
        order = session.match(entries, source.index()) if entries is not None else None
        for name, tensor in source.read(order):
            session.arrive(name, tensor)
            del tensor      # a handed-over device tensor is freed before the next is read
        return session.finish()
    except BaseException as exc:
        session.fail(exc)          # traces load_failed; nothing unverified stays installed
        raise


def planned_entries(session: LoadSession) -> dict[str, TensorEntry]:
    """Every required piece as a header entry: what a perfect checkpoint would hold."""
    entries = {}
    for rec in session.plan.layers.values():
        for name, piece in rec.pieces.items():
            if not piece.optional:
                slot = rec.slots[rec.slot_attr(piece.param)]
                entries[name] = TensorEntry(name, expected_shape(rec, piece), slot.dtype)
    return entries
