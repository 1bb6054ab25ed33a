"""Reloading a loaded model in place: the reload transaction, push routing, the weight
sync and its torch.distributed transport."""

from .sync import SyncReport, WeightSync
from .transaction import ReloadTransaction
from .transport import WeightReceiver, WeightSender

__all__ = ["ReloadTransaction", "SyncReport", "WeightReceiver", "WeightSender", "WeightSync"]
