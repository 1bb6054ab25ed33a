"""The layer lifecycle: states and the one transition table that governs them."""

from __future__ import annotations

from enum import Enum


class LayerState(Enum):
    """Where a layer is on its way from shapes on ``meta`` to a runnable kernel."""

    META = "META"            # shapes only, no memory held
    PARTIAL = "PARTIAL"      # staging materialized, some pieces in
    COMPLETE = "COMPLETE"    # every expected piece in, full precision
    QUANTIZED = "QUANTIZED"  # handler produced the low-precision tensors, staging freed
    FINALIZED = "FINALIZED"  # kernel layout installed; the layer can run


S = LayerState

# One row per allowed move. Anything else raises IllegalTransitionError.
TRANSITIONS = [
    {"trigger": "arrive",   "source": S.META,      "dest": S.PARTIAL},
    {"trigger": "arrive",   "source": S.PARTIAL,   "dest": S.PARTIAL},
    {"trigger": "complete", "source": S.PARTIAL,   "dest": S.COMPLETE},
    # A layer whose pieces are all optional (kv-cache scales, say) takes defaults.
    {"trigger": "default",  "source": [S.META, S.PARTIAL], "dest": S.COMPLETE},
    {"trigger": "quantize", "source": S.COMPLETE,  "dest": S.QUANTIZED},
    {"trigger": "finalize", "source": S.QUANTIZED, "dest": S.FINALIZED},
    # RL weight sync: new staging while the live kernel tensors stay in place.
    {"trigger": "reload",   "source": S.FINALIZED, "dest": S.META},
    # A reload that cannot finish keeps the live (old) kernel tensors.
    {"trigger": "rollback", "source": [S.META, S.PARTIAL, S.COMPLETE, S.QUANTIZED],
     "dest": S.FINALIZED},
    # A first load that failed: the layer's staging and unverified results are dropped,
    # nothing of it was installed.
    {"trigger": "abandon",  "source": [S.PARTIAL, S.COMPLETE, S.QUANTIZED], "dest": S.META},
]
