"""Pinned staging for host-to-device reads: a ring of page-locked buffers.

A tensor read from the page cache straight into pinned memory is copied to the GPU
asynchronously (about 55 GB/s on an H200 against 6.7 GB/s from pageable memory),
while the CPU fills the next buffer. Each buffer is reused only after the copy
that read it has finished (a CUDA event per buffer).
"""

from __future__ import annotations

import torch


class PinnedRing:
    """``count`` pinned buffers of ``nbytes`` each, handed out in turn."""

    def __init__(self, nbytes: int, device: torch.device, count: int = 2):
        self.nbytes = nbytes
        self._buffers = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
                         for _ in range(count)]
        self._events: list[torch.cuda.Event | None] = [None] * count
        self._device = device
        self._next = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` of the next buffer, once the copies reading it finished."""
        slot = self._next
        self._next = (slot + 1) % len(self._buffers)
        if self._events[slot] is not None:
            self._events[slot].synchronize()
        self._last = slot
        return self._buffers[slot][:nbytes]

    def release(self) -> None:
        """Mark the last staged buffer in use by copies enqueued so far on the device."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self._device))
        self._events[self._last] = event
