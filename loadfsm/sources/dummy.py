"""The dummy load format: seeded random weights through the real load path.

Every expected piece gets a tensor drawn uniformly from ``[-low, high]`` in the
checkpoint dtype, generated on the target device one layer at a time, so the
peak-memory bound of a real load holds. The generator of each piece is seeded
from ``seed`` and the piece's name: same seed, same weights on the same device,
whatever else the model holds.
"""

from __future__ import annotations

import zlib
from typing import Iterable, Iterator

import torch

from ..plan import TensorEntry

DUMMY_RANGE = 1e-3


class DummySource:
    """Produces one seeded random tensor per planned piece."""

    def __init__(self, entries: dict[str, TensorEntry], *, device: torch.device,
                 seed: int = 0, scale: float = DUMMY_RANGE):
        self._entries, self.device, self.seed, self.scale = entries, device, seed, scale

    def entries(self) -> dict[str, TensorEntry]:
        return self._entries

    def index(self) -> dict[str, str]:
        return {}

    def file_of(self, name: str) -> None:
        return None

    def read(self, order: Iterable[str] | None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in (self._entries if order is None else order):
            entry = self._entries[name]
            generator = torch.Generator(self.device)
            generator.manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
            tensor = torch.empty(entry.shape, dtype=entry.dtype, device=self.device)
            tensor.uniform_(-self.scale, self.scale, generator=generator)
            yield name, tensor

    def close(self) -> None:
        """Nothing to release: tensors are generated, no file is open."""
