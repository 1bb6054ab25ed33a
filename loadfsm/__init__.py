"""loadfsm: layer-by-layer weight loading where every layer is a state machine."""

import warnings

with warnings.catch_warnings():
    # torch warns at import when numpy is absent; loadfsm never needs numpy.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch  # noqa: F401

from .api import load
from .errors import (ConcurrentPushError, CorruptCheckpointError, DtypeMismatchError,
                     DuplicateWeightError, IllegalTransitionError, IncompleteLoadError,
                     LoadError, ModelStateError, NonFiniteWeightError, PushError,
                     ShapeMismatchError, UnexpectedWeightError)
from .errors import (BadWeightItemError, CheckpointChangedError, TraceOverwritesInputError,
                     UnsafeCheckpointPathError, UnsupportedDeviceError)
from .errors import InvalidScaleError
from .integrations.engine import ShardWriteError, UnknownShardError
from .quant.config import Fp8Config, Int8Config
from .quant.fp8_layout import Fp8CheckpointConfig
from .quant.push_fp8 import quantize_for_push
from .reload.colocated import ColocatedSender, ReceiverDiedError, SenderDiedError
from .reload.colocated_receiver import ColocatedReceiver
from .reload.delta import DeltaPush, DeltaReport
from .reload.delta_receiver import DeltaReceiver, StaleDeltaError
from .reload.delta_transport import DeltaSender, PushNotTakenError
from .reload.tile_push import TileDelta, TilePatch, apply_tile_delta
from .reload.transport import WeightReceiver, WeightSender
from .report import LoadReport
from .session import LoadSession
from .states import LayerState
from .sync import SyncReport, WeightSync

__all__ = [
    "load", "LoadSession", "LoadReport", "LayerState", "Fp8Config", "Int8Config",
    "LoadError", "IllegalTransitionError", "CorruptCheckpointError", "UnexpectedWeightError",
    "DuplicateWeightError", "ShapeMismatchError", "DtypeMismatchError",
    "NonFiniteWeightError", "IncompleteLoadError", "PushError", "WeightSync", "SyncReport",
    "UnknownShardError", "ShardWriteError", "ConcurrentPushError", "ModelStateError",
    "WeightSender", "WeightReceiver",
]
__all__ += ["ColocatedSender", "ColocatedReceiver", "SenderDiedError", "ReceiverDiedError"]
__all__ += ["UnsafeCheckpointPathError", "CheckpointChangedError", "TraceOverwritesInputError",
            "BadWeightItemError", "UnsupportedDeviceError"]
__all__ += ["Fp8CheckpointConfig", "quantize_for_push", "InvalidScaleError"]
__all__ += ["DeltaPush", "DeltaReport", "TileDelta", "TilePatch", "apply_tile_delta"]
__all__ += ["DeltaSender", "DeltaReceiver", "StaleDeltaError", "PushNotTakenError"]
