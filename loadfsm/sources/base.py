"""Sources: where arrivals come from. A source never touches layers."""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Protocol

import torch

from ..errors import BadWeightItemError
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

    def file_of(self, name: str) -> str | None:
        """The file holding ``name``, for error messages (``None`` when there is none)."""
        ...

    def close(self) -> None: ...


class IteratorSource:
    """A user's iterable of ``(name, tensor)``; order unknown, nothing to plan with."""

    def __init__(self, weights):
        self._weights = iter_weights(weights)

    def entries(self) -> None:
        return None

    def index(self) -> dict[str, str]:
        return {}

    def read(self, order=None) -> Iterator[tuple[str, torch.Tensor]]:
        return self._weights

    def close(self) -> None:
        """Nothing to release: the iterable belongs to the caller."""

    def file_of(self, name: str) -> None:
        return None


def iter_weights(weights) -> Iterator[tuple[str, torch.Tensor]]:
    """The ``(name, tensor)`` pairs of a user's iterable, each checked as it comes; a
    mapping or a non-iterable is refused at once (typed, before anything is read)."""
    if isinstance(weights, Mapping):
        raise BadWeightItemError(f"weights is a {type(weights).__name__}; pass "
                                 f"its .items() for (name, tensor) pairs")
    try:
        items = iter(weights)
    except TypeError:
        raise BadWeightItemError(f"weights must be an iterable of (name, tensor) pairs, "
                                 f"got {type(weights).__name__}") from None
    return (_checked(position, item) for position, item in enumerate(items))


def _checked(position: int, item) -> tuple[str, torch.Tensor]:
    """``item`` if it is a ``(str, Tensor)`` pair; a typed error naming what it is else."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise BadWeightItemError(f"item {position} of the weights is a "
                                 f"{type(item).__name__}, not a (name, tensor) pair")
    name, tensor = item
    if not isinstance(name, str):
        raise BadWeightItemError(f"item {position} of the weights has a name of type "
                                 f"{type(name).__name__}, not str")
    if not isinstance(tensor, torch.Tensor):
        raise BadWeightItemError(f"the value is a {type(tensor).__name__}, not a torch.Tensor",
                                 tensor=name)
    if tensor.is_meta:
        raise BadWeightItemError("the tensor is on the meta device: it holds no data",
                                 tensor=name)
    return name, tensor
