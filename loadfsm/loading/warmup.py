"""Kernels readied in the background while the first tensors are read.

A first load in a fresh process would otherwise stop at its first quantized layer
while Triton initializes and loads its kernels. Each handler the plan uses gets its
``prepare`` run in one thread started with the session; until that thread is done the
driver quantizes under the handler's ``unprepared()`` (FP8: the torch reference,
bit-identical), so no layer waits and no kernel is launched from two threads at once.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterable

import torch


class KernelWarmup:
    """The preparation of ``handlers`` for ``config`` on ``device``, in a thread."""

    def __init__(self, handlers: Iterable, config, device: torch.device):
        self._thread = threading.Thread(target=self._prepare, name="loadfsm-warmup",
                                        args=(list(handlers), config, device), daemon=True)
        self._thread.start()

    @staticmethod
    def _prepare(handlers: list, config, device: torch.device) -> None:
        try:
            with (torch.cuda.device(device) if device.type == "cuda"
                  else contextlib.nullcontext()):
                for handler in handlers:
                    handler.prepare(config, device)
        except Exception:       # noqa: BLE001 -- only a head start: a kernel that cannot
            return              # run fails again at its first layer, typed, in the load

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> None:
        self._thread.join()
