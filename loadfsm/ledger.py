"""Memory ledger: the bytes a session has materialized, and their peak."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass
class MemoryLedger:
    """Counts staging (full precision, in flight) and final (kept) bytes.

    The peak is taken after every change, so a quantized output allocated before
    its staging is freed shows up in it, as it does on the device.
    """

    staging: int = 0
    final: int = 0
    peak: int = 0

    def add_staging(self, n: int) -> None:
        self.staging += n
        self._bump()

    def free_staging(self, n: int) -> None:
        self.staging -= n

    def add_final(self, n: int) -> None:
        self.final += n
        self._bump()

    def free_final(self, n: int) -> None:
        self.final -= n

    def _bump(self) -> None:
        self.peak = max(self.peak, self.staging + self.final)
