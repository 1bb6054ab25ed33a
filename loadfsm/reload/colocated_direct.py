"""Direct shares of the colocated transport: a large trainer tensor is not copied into a
bucket; the engine maps the tensor's own storage and reads it in place.

A bucket costs the trainer a fill copy that runs serially with the engine's apply; for
the few large tensors of a model (embedding, lm_head: half the bytes of a small Llama)
the engine reads the trainer's storage instead (its CUDA IPC handle; on CPU the storage
moved once into shared memory, so CI runs the same protocol).

A storage the engine maps keeps the trainer's memory allocated (torch does not reuse
freed CUDA memory that another process maps), so a mapping outlives its push only when
the trainer is seen to keep the storage: pushed in two pushes in a row. A trainer that
makes new tensors every push (FSDP gathering full weights, parameters offloaded between
steps) gets its memory back at the end of each push; one that keeps its parameters has
each storage shared twice (first and second push), then never again. "The same
storage" is the storage object itself (a weak reference), never an address alone: a
freed storage's address is reused.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

import torch


@dataclass
class _Storage:
    """A trainer storage pushed directly."""

    ref: weakref.ref          # the storage object; dead once the trainer freed it
    since: int                # the first push of its current run of pushes in a row
    push: int = 0             # the last push that read it
    id: int | None = None     # the engine's mapping of it; None: not mapped now


class DirectShares:
    """Trainer side: which of its storages the engine maps, and when each mapping is
    dropped. One push at a time: ``begin``, ``mapped``/``share_as`` per tensor, ``end``."""

    def __init__(self):
        self._held: dict[int, _Storage] = {}      # storage data_ptr -> its record
        self._push = 0
        self._ids = itertools.count(1)
        self._replaced: list[int] = []            # mappings of storages freed mid-push

    def begin(self) -> list[int]:
        """A push starts; returns the mappings to drop at once: their storages were freed,
        and the trainer has that memory back only once the engine lets go."""
        self._push += 1
        dead = [ptr for ptr, held in self._held.items() if held.ref() is None]
        return [held.id for held in map(self._held.pop, dead) if held.id is not None]

    def mapped(self, storage: torch.UntypedStorage) -> int | None:
        """The engine's mapping of ``storage``, read by this push; ``None``: share it
        (``share_as``)."""
        held = self._held.get(storage.data_ptr())
        if held is None or held.ref() is not storage:
            return None
        held.push = self._push
        return held.id

    def share_as(self, storage: torch.UntypedStorage) -> int:
        """A new mapping id for ``storage``, which is being shared (at its address after
        any move into shared memory)."""
        ptr = storage.data_ptr()
        held = self._held.get(ptr)
        if held is None or held.ref() is not storage:
            if held is not None and held.id is not None:
                self._replaced.append(held.id)
            held = self._held[ptr] = _Storage(weakref.ref(storage), since=self._push)
        held.push, held.id = self._push, next(self._ids)
        return held.id

    def end(self) -> list[int]:
        """The push sent its last tensor; returns the mappings the engine drops now: the
        storages this push did not read, and those it read for the first time in a row
        (remembered, unmapped: mapped for good if the next push reads them too)."""
        drop, self._replaced = self._replaced, []
        for ptr, held in list(self._held.items()):
            if held.ref() is None or held.push != self._push:
                del self._held[ptr]
            elif held.since != self._push:
                continue
            if held.id is not None:
                drop.append(held.id)
                held.id = None
        return drop

    def clear(self) -> None:
        self._held.clear()
        self._replaced.clear()


def storage_view(base: torch.Tensor, dtype: torch.dtype, shape: tuple, stride: tuple,
                 offset: int) -> torch.Tensor:
    """The tensor (``dtype``, ``shape``, ``stride``, ``offset`` in elements) that lies in
    the storage of ``base`` (the engine's mapping of a whole trainer storage)."""
    return torch.empty(0, dtype=dtype, device=base.device).set_(
        base.untyped_storage(), offset, shape, stride)
