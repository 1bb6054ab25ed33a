"""The reload transaction: one push into a loaded session, committed or rolled back.

While a transaction is attached, the session's driver runs in reload mode and the
session finalizes through ``commit``: steps R1..R4 (ARCHITECTURE.md), cited below.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..atomic import deferred_interrupts
from ..layer import LayerRecord
from ..states import LayerState
from .routes import PushRoutes, Route


class ReloadTransaction:
    """Attach with ``with``; the layers touched, committed, and what arrived."""

    def __init__(self, session, *, hold_all: bool = False, commit_bytes: int | None = None):
        self.session = session
        self.hold_all = hold_all
        self.commit_bytes = commit_bytes
        self.touched: dict[str, LayerRecord] = {}
        self.committed: list[str] = []
        self.current: str | None = None      # the tensor (or loader piece) being fed
        self.received = 0
        self.count = 0
        self.peak_extra = 0                  # the most held beyond the loaded model
        self._base = self._outer_peak = 0

    def __enter__(self) -> "ReloadTransaction":
        session, ledger = self.session, self.session.ledger
        session.transaction = self
        session.driver.reloading = True
        session.driver.borrowing = not self.hold_all
        session.batch.take()
        session.batch.hold_all = self.hold_all
        if self.commit_bytes is not None:
            session.batch.commit_bytes = self.commit_bytes
        self._base, self._outer_peak = ledger.staging + ledger.final, ledger.peak
        ledger.peak = self._base
        return self

    def __exit__(self, *exc) -> None:
        session, ledger = self.session, self.session.ledger
        session.batch.take()
        session.batch.hold_all = False
        session.driver.reloading = False
        session.driver.borrowing = False
        session.transaction = None
        self.peak_extra = ledger.peak - self._base
        ledger.peak = max(self._outer_peak, ledger.peak)

    # -- R1 --------------------------------------------------------------------------
    def begin(self, rec: LayerRecord, name: str) -> bool:
        """``name`` is about to feed ``rec``; the layer's first fires ``reload``.
        Returns whether it was the first."""
        self.current = name
        if rec.name in self.touched:
            return False
        self.touched[rec.name] = rec
        src, dst = rec.fire("reload")
        rec.missing = set(rec.pieces)
        rec.defaulted = []
        self.session.driver.transition(rec, src, dst, "reload")
        return True

    def feed(self, weights: Iterable[tuple[str, torch.Tensor]], routes: PushRoutes) -> None:
        """R1 and R2 for named tensors (checkpoint or parameter names, ``routes``).

        The hot path of a push: per tensor, one table lookup (a ``Route`` made at
        planning), R1 only when the layer changes (consecutive names of one layer are
        the usual order), and the driver's O(1) arrival; nothing else is allocated."""
        driver, table = self.session.driver, routes.table
        last = None
        with torch.no_grad():             # trainer tensors may require grad
            for name, tensor in weights:
                self.current = name
                route = table.get(name)
                if route is None:
                    route = routes.resolve(name, tensor.shape)
                rec, first = route.rec, False
                if rec is not last:
                    first, last = self.begin(rec, name), rec                 # R1
                if route.tied and not first and not _due(rec, route):
                    # The other name of a tied tensor already fed it in this push.
                    self.session.tracer.event("tied_weight", alias=name,
                                              canonical=route.name, skipped=True)
                else:                                                        # R2
                    if tensor.requires_grad:
                        tensor = tensor.detach()
                    if route.param is None:
                        driver.arrive_piece(rec, route.name, tensor)
                    else:
                        driver.arrive_param(rec, route.param, tensor, route.pieces)
                self.received += tensor.nbytes
                self.count += 1
                self.current = None

    def done(self, nbytes_in: int) -> None:
        """The tensor ``begin`` named arrived."""
        self.received += nbytes_in
        self.count += 1
        self.current = None

    # -- R2, R3 ------------------------------------------------------------------------
    def settle(self) -> dict[str, list[str]]:
        """Complete touched layers whose pieces still due have defaults or live buffers;
        return the layers still missing required pieces."""
        missing = {}
        for rec in self.touched.values():
            if rec.state not in (LayerState.META, LayerState.PARTIAL):
                continue
            self._keep_live_buffers(rec)
            if rec.state not in (LayerState.META, LayerState.PARTIAL):
                continue
            due = rec.required_missing()
            if due:
                missing[rec.name] = due
            else:
                self.session.driver.complete_with_defaults(rec)
        return missing

    def _keep_live_buffers(self, rec: LayerRecord) -> None:
        """A trainer's ``named_parameters()`` carries no buffers: a touched layer's
        persistent buffers that were not pushed (DeepSeek-V3's ``e_score_correction_bias``)
        arrive from their live values, so the layer completes with them unchanged."""
        kept = [name for name in rec.required_missing()
                if rec.slots[rec.slot_attr(rec.pieces[name].param)].is_buffer]
        if not kept:
            return
        live = rec.handler.live_tensors(rec)
        self.session.tracer.event("buffers_kept", layer=rec.name, pieces=kept)
        for name in kept:
            piece = rec.pieces[name]
            tensor = live[rec.slot_attr(piece.param)]
            self.session.driver.arrive(name, tensor[piece.region] if piece.region else tensor)

    def commit(self, rec: LayerRecord) -> None:
        """R3 for one verified layer (the session calls it under held SIGINT)."""
        self.session.writer.commit(rec, self.session.ledger)
        self.session.ledger.free_staging(rec.final_bytes)
        self.committed.append(rec.name)

    # -- R4 ----------------------------------------------------------------------------
    def roll_back(self, recs=None) -> list[str]:
        """Every touched layer not committed returns to FINALIZED with its old weights."""
        recs = self.touched.values() if recs is None else recs
        rolled = [rec for rec in recs if rec.state is not LayerState.FINALIZED]
        for rec in rolled:
            self.rollback(rec)
        if rolled:
            self.session.tracer.event("push_rolled_back", layers=[r.name for r in rolled])
        return [rec.name for rec in rolled]

    def rollback(self, rec: LayerRecord) -> None:
        """Free ``rec``'s staging and results, keep its live tensors. Whole under held
        SIGINT: a second Ctrl-C lands after the layer is FINALIZED."""
        with deferred_interrupts():
            self.session.driver.drop(rec)
            rec.missing.clear()
            src, dst = rec.fire("rollback")
            self.session.driver.transition(rec, src, dst, "rollback")


def _due(rec: LayerRecord, route: Route) -> bool:
    names = route.pieces if route.param is not None else (route.name,)
    return all(name in rec.missing for name in names)
