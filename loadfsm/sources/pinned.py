"""Host staging for reads: a ring of buffers, page-locked when the target is a GPU.

A tensor read from the page cache straight into pinned memory is copied to the GPU
asynchronously (about 55 GB/s on an H200 against 6.7 GB/s from pageable memory),
while a reader thread fills the next buffers. A buffer is handed out again only after
its consumer released it and, on a GPU, the device copies enqueued until then have
finished (a CUDA event per buffer). On the CPU the consumer's copy is done when it
releases the buffer.
"""

from __future__ import annotations

import queue
import threading

import torch

POLL_S = 0.05      # how often a blocked reader looks whether it was told to stop


class PinnedRing:
    """``count`` buffers of ``nbytes`` each, allocated on first use; pinned for CUDA."""

    def __init__(self, nbytes: int, device: torch.device, count: int = 3):
        self.nbytes = nbytes
        self._device = device
        self._cuda = device.type == "cuda"
        self._buffers: list[torch.Tensor | None] = [None] * count
        self._free: queue.Queue = queue.Queue()
        for slot in range(count):
            self._free.put((slot, None))

    def acquire(self, stop: threading.Event) -> tuple[int, torch.Tensor] | None:
        """A free buffer once the copies reading it finished; ``None`` once ``stop`` is set."""
        while not stop.is_set():
            try:
                slot, event = self._free.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if event is not None:
                event.synchronize()
            if self._buffers[slot] is None:
                self._buffers[slot] = torch.empty(self.nbytes, dtype=torch.uint8,
                                                  pin_memory=self._cuda)
            return slot, self._buffers[slot]
        return None

    def release(self, slot: int) -> None:
        """The consumer is done with ``slot``: it is free once the copies enqueued so far
        on the device have read it."""
        event = None
        if self._cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self._device))
        self._free.put((slot, event))
