"""``loadfsm.WeightSync``: pushes into a loaded model, and an engine's own loader as a push.

The sync itself is ``reload.WeightSync``; this face adds ``push_with``, which runs
through the engine integration.
"""

from __future__ import annotations

from typing import Callable

from .integrations.engine_load import push_with
from .reload import sync as _reload
from .reload.sync import SyncReport


class WeightSync(_reload.WeightSync):
    __doc__ = _reload.WeightSync.__doc__

    def push_with(self, load: Callable[[], object], *, version=None) -> SyncReport:
        """Run an engine's own loading code as a push, in place:
        ``sync.push_with(lambda: model.load_weights(new_weights))``.

        For models loaded through the engine hook (``with LoadSession(model) as s``).
        While ``load`` runs (under ``torch.no_grad()``), the live parameters' loaders
        are wrapped: each call writes its shard into fresh staging of its layer, and a
        complete layer is quantized and committed as in ``push``. Afterwards every
        parameter's ``weight_loader`` attribute is exactly what it was (also when
        ``load`` raises). Layers ``load`` does not reach keep their weights.

        ``version`` is stamped on the layers that commit, as in ``push``.

        Returns:
            A ``SyncReport``; its tensor and byte counts are of loader calls.

        Raises:
            PushError: as ``push``: a touched layer did not receive all its pieces, or
                ``load`` raised (the cause is chained).
        """
        return push_with(self, load, version=version)
