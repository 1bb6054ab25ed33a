"""The engine hook's two entries: a first load as a context manager, and a push.

    with EngineLoad(session):                    # loadfsm.LoadSession's ``with``
        model.load_weights(weights)
    push_with(sync, lambda: model.load_weights(new_weights))   # WeightSync.push_with

An engine model's pieces are its loader calls: this module registers the engine
planner (``engine_shards.loader_pieces``) for models whose parameters carry
``weight_loader``s. Steps E1..E5: ``engine``.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..loading.planning import register_piece_provider
from ..loading.session import LoadSession
from ..reload.sync import SyncReport, WeightSync
from ..reload.transaction import ReloadTransaction
from .engine import EngineHook
from .engine_shards import loader_pieces, uses_weight_loaders


class EngineLoad:
    """The engine hook as a context manager over a first load:
    ``with EngineLoad(session): model.load_weights(weights)``; then ``session.report``.

    On entry every loader is wrapped (E1). On a clean exit the held layers are installed
    before the loaders are given back, so the engine's attributes reach the installed
    parameters (E5), and the session finishes; on an exception it fails (nothing
    unverified installed) and the exception goes on.
    """

    def __init__(self, session: LoadSession):
        self.session = session
        self._hook: EngineHook | None = None

    def __enter__(self) -> LoadSession:
        if self._hook is not None:
            raise RuntimeError("this LoadSession is already entered")
        self._hook = EngineHook(self.session).install()
        return self.session

    def __exit__(self, exc_type, exc, tb) -> None:
        hook, self._hook, session = self._hook, None, self.session
        try:
            if exc_type is None:
                session.commit_held()
        except BaseException as err:
            hook.restore()
            session.fail(err)
            raise
        hook.restore()
        if exc_type is not None:
            session.fail(exc)
            return
        try:
            session.report = session.finish()
        except BaseException as err:
            session.fail(err)
            raise


def push_with(sync: WeightSync, load: Callable[[], object], *, version=None) -> SyncReport:
    """Run an engine's own loading code as a push into ``sync``'s model, in place (see
    ``loadfsm.WeightSync.push_with``)."""
    def feed(push: ReloadTransaction) -> None:
        hook = EngineHook(sync.session, push).install()
        try:
            with torch.no_grad():
                load()
        finally:
            hook.restore()

    return sync.run(feed, version=version)


register_piece_provider(uses_weight_loaders, loader_pieces)
