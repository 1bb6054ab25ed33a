"""Sources: where arrivals come from. A source never touches layers."""

from __future__ import annotations

from typing import Iterable, Iterator, Protocol

import torch

from ..plan import TensorEntry


class Source(Protocol):
    """Yields ``(checkpoint name, tensor)`` pairs.

    ``entries()`` describes every tensor up front (from headers) so the session
    can plan and order reads by layer; a source that cannot (a user's iterator)
    returns ``None`` and yields in its own order.
    """

    def entries(self) -> dict[str, TensorEntry] | None: ...

    def index(self) -> dict[str, str]:
        """Checkpoint name -> file, as an index file claims (may be empty)."""
        ...

    def read(self, order: Iterable[str] | None) -> Iterator[tuple[str, torch.Tensor]]: ...

    def close(self) -> None: ...


class IteratorSource:
    """A user's iterable of ``(name, tensor)``; order unknown, nothing to plan with."""

    def __init__(self, weights):
        self._weights = weights

    def entries(self) -> None:
        return None

    def index(self) -> dict[str, str]:
        return {}

    def read(self, order=None) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self._weights

    def close(self) -> None:
        """Nothing to release: the iterable belongs to the caller."""

    def file_of(self, name: str) -> None:
        return None
