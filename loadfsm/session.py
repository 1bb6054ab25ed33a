"""``loadfsm.LoadSession``: a load driven by the caller, and the engine hook's entry.

The session itself is ``loading.LoadSession`` (planning, arrivals, verification, the
writer, the report); this face adds the engine hook as its context manager:

    with loadfsm.LoadSession(model, quant="fp8", device="cuda") as session:
        model.load_weights(weights)              # the engine's code, unchanged
    session.report

An engine model's pieces (its ``weight_loader`` calls) are planned by the engine
integration, which registers itself with the planner.
"""

from __future__ import annotations

from .integrations.engine_load import EngineLoad
from .loading import session as _loading


class LoadSession(_loading.LoadSession):
    __doc__ = _loading.LoadSession.__doc__

    _engine: EngineLoad | None = None

    def __enter__(self) -> "LoadSession":
        """Route the model's ``weight_loader`` calls into this session (the engine hook,
        ``loadfsm.integrations.engine``)."""
        if self._engine is not None:
            raise RuntimeError("this LoadSession is already entered")
        self._engine = EngineLoad(self)
        return self._engine.__enter__()

    def __exit__(self, exc_type, exc, tb) -> None:
        """Give every loader back exactly; on a clean exit finish, keeping ``self.report``."""
        engine, self._engine = self._engine, None
        engine.__exit__(exc_type, exc, tb)
